"""MNIST: 60,000 training / 10,000 test grayscale digits, 28×28 (or resized)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from datamodules.base import ImageDataModule, resize_uint8

_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MNISTDataModule(ImageDataModule):
    """MNIST in torchvision's layout: ``<data_root>/MNIST/raw/*-ubyte`` (28×28 native; ``image_size`` resizes).

    Args: see :class:`~datamodules.base.ImageDataModule`.
    """

    name = "mnist"
    num_classes = 10
    in_channels = 1
    default_image_size = 28
    hflip = False  # digits are not mirror-symmetric

    def expected_files(self) -> list[Path]:
        return [self.data_root / "MNIST" / "raw" / f for f in _RAW]

    def fetch(self) -> None:
        for train in (True, False):
            torchvision.datasets.MNIST(str(self.data_root), train=train, download=True)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = torchvision.datasets.MNIST(str(self.data_root), train=train, download=False)
        images = ds.data.unsqueeze(1).contiguous()  # uint8 [N, 1, 28, 28]
        return resize_uint8(images, self.image_size), ds.targets.long()

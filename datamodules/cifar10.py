"""CIFAR-10: 50,000 training / 10,000 test RGB images, 32×32, 10 classes.

Loads the standard python-pickle layout (``cifar-10-batches-py/data_batch_1..5``,
``test_batch``) directly, *without* the official MD5 checksums: a lossless re-encoding of
the data (such as the copy on this project's machines, all 10,000 test images since
2026-11-30) loads as well as the original archive.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision

from datamodules.base import ImageDataModule, resize_uint8

_FOLDER = "cifar-10-batches-py"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = ("test_batch",)


def read_cifar_batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR python batches into ``(uint8 [N, 3, 32, 32], int64 [N])``."""
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: expected data of shape [N, 3072], got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(entry.get("labels", entry.get("fine_labels")), dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 under ``<data_root>/cifar-10-batches-py`` (see module docstring; 32×32 native, ``image_size`` resizes).

    Args: see :class:`~datamodules.base.ImageDataModule`.
    """

    name = "cifar10"
    num_classes = 10
    in_channels = 3
    default_image_size = 32
    hflip = True

    def expected_files(self) -> list[Path]:
        return [self.data_root / _FOLDER / f for f in _TRAIN + _TEST]

    def fetch(self) -> None:
        torchvision.datasets.CIFAR10(str(self.data_root), train=True, download=True)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        names = _TRAIN if train else _TEST
        images, labels = read_cifar_batches([self.data_root / _FOLDER / n for n in names])
        return resize_uint8(images, self.image_size), labels

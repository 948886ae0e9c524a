"""GTSRB: German Traffic Sign Recognition Benchmark, 39,209 training / 12,630 test, 43 classes.

torchvision's layout under ``<data_root>/gtsrb``: ``GTSRB/Training/000NN/*.ppm``,
``GTSRB/Final_Test/Images/*.ppm`` and ``GT-final_test.csv``.  Whole images (the ROI is
not cropped) are resized to ``image_size`` × ``image_size`` once; the decoded tensors are
cached in ``<data_root>/gtsrb/mixdefense_cache/`` so later runs start in a second.

The test set is ~421 tracks of 30 frames of one physical sign each, shuffled.  The protocol's
splits (selection 2,000 / test the rest, :mod:`mixdefense.splits`) keep every sign in one split:
test images are grouped by :func:`mixdefense.grouping.near_duplicate_groups` (each image linked to
its 10 nearest same-label images by 4×4 colour thumbnails; on the training set, whose file names
give the tracks, 99.5 % of tracks stay whole: ``benchmarks/gtsrb_sign_groups.py``).  The groups
are unions of similar tracks, up to a whole class, so the splits' class mixes differ: the
selection split (2,460 images) holds 17 classes, the test split (10,170) 35 of the 43.  The groups
are cached beside the images.  A class-balanced test-set calibration split cannot be cut from whole
signs, so thresholds come from the training set's held-out images: with ``val_grouping="random"``
(the default) they are frames of the training tracks, near twins of images the parts trained on,
and their thresholds reject more on new signs; with ``val_grouping="groups"`` whole tracks
(:meth:`GTSRBDataModule.train_groups`, from the file names) are held out, class-stratified, and
the calibration split ``"val_groups"`` holds signs the parts never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from tqdm.auto import tqdm

from datamodules.base import ImageDataModule


def track_id(path: str | Path, label: int) -> int:
    """The track (physical sign) of a GTSRB training image from its file name ``<track>_<frame>.ppm``:
    ``label * 10000 + track`` (track numbers restart in every class folder)."""
    stem = Path(path).stem
    track, sep, frame = stem.partition("_")
    if not sep or not track.isdigit() or not frame.isdigit():
        raise ValueError(f"not a GTSRB training file name <track>_<frame>.ppm: {path}")
    return int(label) * 10000 + int(track)


class GTSRBDataModule(ImageDataModule):
    """GTSRB, every image resized to ``image_size`` (default 32; the originals are 15–250 px).

    No horizontal flip: signs are not symmetric.  Args: see :class:`~datamodules.base.ImageDataModule`.
    """

    name = "gtsrb"
    num_classes = 43
    in_channels = 3
    default_image_size = 32
    hflip = False
    protocol_sizes = {"selection": 2000}

    @property
    def base(self) -> Path:
        return self.data_root / "gtsrb"

    def expected_files(self) -> list[Path]:
        return [self.base / "GTSRB" / "Training", self.base / "GTSRB" / "Final_Test" / "Images", self.base / "GT-final_test.csv"]

    def fetch(self) -> None:
        for split in ("train", "test"):
            torchvision.datasets.GTSRB(str(self.data_root), split=split, download=True)

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        split = "train" if train else "test"
        cache = self.base / "mixdefense_cache" / f"{split}_{self.image_size}.pt"
        if cache.exists():
            payload = torch.load(cache, weights_only=True)
            return payload["images"], payload["labels"]
        samples = torchvision.datasets.GTSRB(str(self.data_root), split=split, download=False)._samples
        size = (self.image_size, self.image_size)
        images = np.empty((len(samples), size[0], size[1], 3), dtype=np.uint8)
        labels = np.empty(len(samples), dtype=np.int64)
        for i, (path, label) in enumerate(tqdm(samples, desc=f"gtsrb: decoding {split}", leave=False)):
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != size:
                    img = img.resize(size, Image.BILINEAR)
                images[i] = np.asarray(img)
            labels[i] = label
        payload = {"images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), "labels": torch.from_numpy(labels)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(cache)
        return payload["images"], payload["labels"]

    def train_groups(self) -> torch.Tensor:
        """One group id per training image ``[39209]``: its physical sign's track (``class * 10000 + track``),
        read from the file names ``GTSRB/Training/<class>/<track>_<frame>.ppm`` in the order the images
        are loaded (``val_grouping="groups"``: a validation split of whole signs)."""
        samples = torchvision.datasets.GTSRB(str(self.data_root), split="train", download=False)._samples
        return torch.tensor([track_id(path, label) for path, label in samples], dtype=torch.long)

    def test_groups(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One group id per test image ``[12630]``: the physical signs (see the module docstring), computed
        on the 32×32 images whatever ``image_size`` is, so every size gets the same splits; cached."""
        from mixdefense.grouping import near_duplicate_groups

        cache = self.base / "mixdefense_cache" / "test_sign_groups_v1.pt"
        if cache.exists():
            groups = torch.load(cache, weights_only=True)
            if groups.shape == labels.shape:
                return groups
        if self.image_size != 32:
            images, labels = GTSRBDataModule(data_root=str(self.data_root), image_size=32).load_split(train=False)
        groups = near_duplicate_groups(images, labels)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(groups, tmp)
        tmp.replace(cache)
        return groups

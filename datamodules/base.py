"""Shared base of the image datamodules: in-memory uint8 tensors, a seeded split, [0, 1] floats.

Every dataset is decoded once into a ``uint8`` tensor ``[N, C, H, W]`` kept in memory (the
three datasets of the paper fit in well under 1 GB), so a CPU epoch costs no image decoding.
Batches are float tensors in ``[0, 1]``: normalisation belongs to the model, never to the data.
Training-time augmentation (random translation, optional horizontal flip) is applied to the
whole batch at once in :meth:`on_after_batch_transfer`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from mixdefense.splits import CALIBRATION_SPLITS, protocol_splits


def default_data_root() -> Path:
    """``$MIXDEFENSE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("MIXDEFENSE_DATA", "data"))


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing and could not be downloaded."""


class ImageTensorDataset(Dataset):
    """``(image, label)`` pairs from a ``uint8`` tensor ``[N, C, H, W]``.

    ``__getitem__`` returns a float image in ``[0, 1]`` of shape ``[C, H, W]`` and an int label,
    and with ``with_index`` also the item's index (for per-image caches such as
    :class:`mixdefense.triplets.ReferenceBank`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, with_index: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        self.images, self.labels, self.with_index = images, labels.long(), with_index

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        if self.with_index:
            return self.images[i].float().div_(255.0), self.labels[i], i
        return self.images[i].float().div_(255.0), self.labels[i]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``uint8 [N, C, H, W]`` images to ``size × size`` (bilinear, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        f = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(f.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image of ``x [B, C, H, W]`` by an independent random offset in ``[-pad, pad]``.

    Equivalent to zero-padding by ``pad`` and taking a random crop of the original size.
    """
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of ``x [B, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


#: values of ``test_split``
TEST_SPLIT_CHOICES = ("test", "selection", "calibration", "all")
#: values of ``val_grouping``
VAL_GROUPINGS = ("random", "groups")


class ImageDataModule(pl.LightningDataModule):
    """Base datamodule: subclasses set ``name``, ``num_classes``, ``in_channels``, ``default_image_size``
    and implement :meth:`load_split` and :meth:`expected_files`.

    Args:
        data_root: folder holding the dataset in torchvision's layout; default
            ``$MIXDEFENSE_DATA`` or ``./data``.
        download: download missing files where the internet is reachable.
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0 is fastest for in-memory data on a CPU).
        val_fraction: share of the training set held out for validation (seeded split).
        seed: seed of the train/validation split.
        val_grouping: how the validation images are drawn: ``"random"`` (default: single images;
            on a dataset of video frames they have near twins in the training split) or
            ``"groups"`` (whole groups of :meth:`train_groups`, e.g. GTSRB's physical-sign tracks,
            class-stratified: validation images of objects never trained on, the calibration split
            ``"val_groups"``).  Parts calibrated on such a split must be trained with the same setting.
        augment: apply random translation (and flip, where the dataset allows) to training batches.
        translate: maximal shift in pixels of the random translation.
        train_subset / test_subset: keep only the first N images of a split (quick runs, tests).
        test_split: which part of the test set ``data_test`` holds (:mod:`mixdefense.splits`):
            ``"test"`` (default: the protocol's test split, reported once), ``"selection"`` (every
            choice between variants and settings), ``"calibration"`` (for a datamodule whose
            ``protocol_sizes`` holds a test-set calibration split; none of the shipped ones) or ``"all"`` (the whole test set).  ``split_indices["test"]`` records
            which test images they are.
        image_size: side length ``H = W`` of the images, in pixels; ``None`` keeps the dataset's
            :attr:`default_image_size` (its native size for MNIST and CIFAR-10), another value
            resizes at load time (bilinear, antialiased).
        class_balance: ``α ∈ [0, 1]``: training images are drawn (with replacement, as many per
            epoch as the split holds) with probability ``∝ n_class^−α`` — 0 (default) is the plain
            shuffle, 0.5 square-root sampling, 1 every class equally often.  For long-tailed
            training sets (GTSRB: 210 to 2,250 images per class).
        train_indices: training batches are ``(x, y, index)``, ``index [B]`` the images' positions
            in the training split (for per-image caches: ContraNet's ``MetricModule(reference_bank=True)``).
    """

    name: str = ""
    num_classes: int = 0
    in_channels: int = 0
    default_image_size: int = 0
    hflip: bool = False
    #: sizes of the protocol's selection (and, for datasets calibrated on test images, calibration)
    #: splits of the test set (mixdefense.splits); the test split takes the rest
    protocol_sizes: dict[str, int] = {"selection": 2000}

    def __init__(
        self,
        data_root: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: bool = True,
        translate: int = 2,
        train_subset: int | None = None,
        test_subset: int | None = None,
        image_size: int | None = None,
        class_balance: float = 0.0,
        train_indices: bool = False,
        test_split: str = "test",
        val_grouping: str = "random",
    ):
        super().__init__()
        image_size = self.default_image_size if image_size is None else image_size
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= class_balance <= 1.0:
            raise ValueError(f"class_balance must be in [0, 1], got {class_balance}")
        if translate < 0:
            raise ValueError(f"translate must be >= 0 pixels, got {translate}")
        if val_grouping not in VAL_GROUPINGS:
            raise ValueError(f"val_grouping must be one of {VAL_GROUPINGS}, got {val_grouping!r}")
        if test_split not in TEST_SPLIT_CHOICES:
            raise ValueError(f"test_split must be one of {TEST_SPLIT_CHOICES}, got {test_split!r}")
        for key, value in (("train_subset", train_subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be None (all images) or >= 1, got {value}")
        self.data_root = Path(data_root) if data_root else default_data_root()
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.augment = augment
        self.translate = translate
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.image_size = image_size
        self.class_balance = class_balance
        self.train_indices = train_indices
        self.test_split = test_split
        self.val_grouping = val_grouping
        self.split_indices: dict[str, torch.Tensor] = {}
        self.data_train: ImageTensorDataset | None = None
        self.data_val: ImageTensorDataset | None = None
        self.data_test: ImageTensorDataset | None = None

    # -- to implement -------------------------------------------------------------------
    def expected_files(self) -> list[Path]:
        """The files (or folders) that must exist under :attr:`data_root`."""
        raise NotImplementedError

    def fetch(self) -> None:
        """Download the dataset into :attr:`data_root` (torchvision's downloader)."""
        raise NotImplementedError

    def load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images uint8 [N, C, image_size, image_size], labels int64 [N])`` of the train or test split."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def check_split(self, images: object, labels: object, split: str) -> None:
        """Refuse a decoded split that is not ``uint8 [N ≥ 1, in_channels, image_size, image_size]``
        with ``int64 [N]`` labels in ``[0, num_classes)`` (a corrupt or foreign dataset file)."""
        where = f"{self.name} {split} split under {self.data_root}"
        expected = f"uint8 [N, {self.in_channels}, {self.image_size}, {self.image_size}]"
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{where}: expected images {expected}, got {got}")
        if images.shape[0] == 0:
            raise ValueError(f"{where}: no images")
        if tuple(images.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"{where}: expected images {expected}, got {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or torch.is_floating_point(labels):
            got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{where}: expected integer labels [{images.shape[0]}], got {got}")
        if labels.min().item() < 0 or labels.max().item() >= self.num_classes:
            raise ValueError(f"{where}: labels must lie in [0, {self.num_classes}), "
                             f"got range [{labels.min().item()}, {labels.max().item()}]")

    def missing_files(self) -> list[Path]:
        return [p for p in self.expected_files() if not p.exists()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if not missing:
            return
        if self.download:
            try:
                self.fetch()
            except Exception as err:  # no internet, server down, …
                raise DatasetNotFoundError(self._missing_message(missing, f"download failed: {err}")) from err
            missing = self.missing_files()
        if missing:
            raise DatasetNotFoundError(self._missing_message(missing))

    def _missing_message(self, missing: list[Path], reason: str | None = None) -> str:
        lines = [f"{self.name}: dataset not found under {self.data_root.resolve()}"]
        if reason:
            lines.append(f"  ({reason})")
        lines.append("  missing:")
        lines += [f"    {p}" for p in missing[:8]]
        if len(missing) > 8:
            lines.append(f"    … and {len(missing) - 8} more")
        lines.append(
            "  fix: pass download=True (or --data.init_args.download=true) where the internet is "
            "reachable, or write the files there, e.g. `python ../shared/data/materialize.py --to "
            f"{self.data_root}` on the project's machines, or point $MIXDEFENSE_DATA at a folder holding them."
        )
        return "\n".join(lines)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if stage in (None, "fit", "validate") and self.data_train is None:
            images, labels = self.load_split(train=True)
            self.check_split(images, labels, "train")
            if self.train_subset:
                images, labels = images[: self.train_subset], labels[: self.train_subset]
            val_idx, train_idx = self._val_train_indices(labels)
            self.data_train = ImageTensorDataset(images[train_idx], labels[train_idx], with_index=self.train_indices)
            self.data_val = ImageTensorDataset(images[val_idx], labels[val_idx])
            #: where each training / validation image sits in the source training set (disjoint by construction)
            self.split_indices.update(train=train_idx, val=val_idx)
        if stage in (None, "test", "predict") and self.data_test is None:
            images, labels = self.load_split(train=False)
            self.check_split(images, labels, "test")
            if self.test_split == "all":
                idx = torch.arange(len(labels))
            else:
                idx = self.protocol_splits(images, labels)[self.test_split]
                if not len(idx):
                    raise ValueError(f"{self.name} has no test-set {self.test_split!r} split "
                                     "(its calibration images are the validation split)")
            if self.test_subset:
                idx = idx[: self.test_subset]
            self.data_test = ImageTensorDataset(images[idx], labels[idx])
            #: which test images ``data_test`` holds (positions in the whole test set)
            self.split_indices["test"] = idx

    def _val_train_indices(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(val_idx, train_idx)`` of the (possibly truncated) training set: disjoint, complete.

        The validation images come in a seeded random order (a class-sorted source such as GTSRB would
        otherwise put only its first classes in a truncated validation: ``limit_val_batches``, the first
        N calibration images); the training indices are sorted.
        """
        n_val = int(round(len(labels) * self.val_fraction))
        gen = torch.Generator().manual_seed(self.seed)
        if self.val_grouping == "random":
            perm = torch.randperm(len(labels), generator=gen)
            return perm[:n_val], perm[n_val:].sort().values
        groups = self.train_groups()
        if groups is None:
            raise ValueError(f"{self.name} has no groups of training images: val_grouping must be 'random'")
        groups = groups[: len(labels)]
        if n_val == 0:
            return torch.empty(0, dtype=torch.long), torch.arange(len(labels))
        from mixdefense.grouping import group_split

        parts = group_split(groups, {"val": n_val, "train": None}, seed=self.seed, strata=labels)
        val_idx = parts["val"][torch.randperm(len(parts["val"]), generator=gen)]
        return val_idx, parts["train"].sort().values

    def train_groups(self) -> torch.Tensor | None:
        """Group ids ``[N]`` of the training images (one physical object, e.g. one sign's video track)
        for ``val_grouping="groups"``; ``None`` (default): the dataset has no such structure."""
        return None

    def test_groups(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Group ids ``[N]`` of test images that must stay in one split (one physical object); ``None``: independent images."""
        return None

    def calibration_data(self, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(x float [N, C, H, W] in [0, 1], y [N], source)``: the first ``n`` clean calibration images of ``split``.

        ``"val"``: the validation split the training configs hold out (``val_fraction=0.1``, seed 0),
        source ``{"split": "val"}``; ``"val_groups"``: the same share held out as whole groups
        (``val_grouping="groups"``: objects the parts trained with that setting never saw), source
        ``{"split": "val_groups"}``; ``"test_calibration"``: the test set's calibration split
        (:mod:`mixdefense.splits`), source ``{"split": "test_calibration", "test_indices": [...]}``.
        """
        if split not in CALIBRATION_SPLITS:
            raise ValueError(f"calibration split must be one of {CALIBRATION_SPLITS}, got {split!r}")
        dm = type(self)(data_root=str(self.data_root), image_size=self.image_size, val_fraction=0.1, seed=0,
                        test_split="calibration" if split == "test_calibration" else "test",
                        val_grouping="groups" if split == "val_groups" else "random")
        if split in ("val", "val_groups"):
            dm.setup("fit")
            return dm.data_val.images[:n].float() / 255, dm.data_val.labels[:n], {"split": split}
        dm.setup("test")
        if n is not None and n > len(dm.data_test):
            raise ValueError(f"{self.name}'s calibration split holds {len(dm.data_test)} images, asked for {n}")
        idx = dm.split_indices["test"][:n]
        return dm.data_test.images[:n].float() / 255, dm.data_test.labels[:n], {"split": split, "test_indices": idx.tolist()}

    def protocol_splits(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The protocol's calibration / selection / test index sets of the test set (:func:`mixdefense.splits.protocol_splits`)."""
        return protocol_splits(len(labels), self.protocol_sizes, self.test_groups(images, labels), seed=0)

    def _loader(self, data: Dataset | None, shuffle: bool, sampler: WeightedRandomSampler | None = None) -> DataLoader:
        if data is None:
            raise RuntimeError(f"{self.name}: call setup() before asking for a dataloader")
        return DataLoader(
            data, batch_size=self.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def class_balanced_sampler(self) -> WeightedRandomSampler | None:
        """The training sampler for ``class_balance = α > 0``: image weights ``n_class^−α``; else ``None``."""
        if not self.class_balance:
            return None
        if self.data_train is None:
            raise RuntimeError(f"{self.name}: call setup() before asking for a dataloader")
        labels = self.data_train.labels
        counts = torch.bincount(labels).double()
        weights = counts[labels].pow(-self.class_balance)
        return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, shuffle=True, sampler=self.class_balanced_sampler())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if self.augment and trainer is not None and trainer.training:
            x, *rest = batch
            x = random_translate(x, self.translate)
            if self.hflip:
                x = random_hflip(x)
            batch = (x, *rest)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_root={str(self.data_root)!r}, batch_size={self.batch_size})"

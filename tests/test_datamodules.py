"""Datamodules on the real, materialised datasets: counts, shapes, ranges, split, errors."""

from __future__ import annotations

import pytest
import torch

from datamodules import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    GTSRBDataModule,
    MNISTDataModule,
)
from datamodules.base import random_hflip, random_translate

# (class, train + val, test, channels, size, classes)
REAL = [
    (MNISTDataModule, 60000, 10000, 1, 28, 10),
    (CIFAR10DataModule, 50000, 10000, 3, 32, 10),  # the full official test set (../shared/data since 2026-11-30)
    (GTSRBDataModule, 39209, 12630, 3, 32, 43),
]


@pytest.mark.parametrize("cls,n_train,n_test,channels,size,classes", REAL, ids=lambda v: getattr(v, "name", None))
def test_real_counts_shapes_and_range(data_root, cls, n_train, n_test, channels, size, classes):
    dm = cls(data_root=str(data_root), batch_size=64, val_fraction=0.1, test_split="all")
    dm.setup()
    assert len(dm.data_train) + len(dm.data_val) == n_train
    assert len(dm.data_val) == round(n_train * 0.1)
    assert len(dm.data_test) == n_test and torch.equal(dm.split_indices["test"], torch.arange(n_test))
    # the protocol's splits (mixdefense.splits) cut the whole test set into disjoint parts
    parts = {s: cls(data_root=str(data_root), test_split=s) for s in ("test", "selection")}
    for part in parts.values():
        part.setup("test")
    idx = {s: p.split_indices["test"] for s, p in parts.items()}
    assert len(idx["selection"]) >= cls.protocol_sizes["selection"] and len(idx["test"]) >= n_test // 2
    assert not set(idx["test"].tolist()) & set(idx["selection"].tolist())
    assert torch.equal(parts["test"].data_test.images, dm.data_test.images[idx["test"]])
    groups = dm.test_groups(dm.data_test.images, dm.data_test.labels)
    if groups is not None:  # GTSRB: whole physical signs, no sign in two splits
        assert not set(groups[idx["test"]].tolist()) & set(groups[idx["selection"]].tolist())
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (64, channels, size, size) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5  # [0, 1], not normalised
    assert y.dtype == torch.long
    labels = torch.cat([dm.data_train.labels, dm.data_val.labels])
    assert labels.unique().tolist() == list(range(classes))
    assert (cls.num_classes, cls.in_channels, dm.image_size) == (classes, channels, size)


def test_mnist_pixel_mean_matches_reference(data_root):
    dm = MNISTDataModule(data_root=str(data_root), val_fraction=0.0)
    dm.setup("fit")
    mean = dm.data_train.images.float().mean().item()
    assert abs(mean - 33.32) < 0.05  # ../shared/data/README.md: pixel mean 33.32 on the training set


def test_split_is_seeded_and_disjoint(data_root):
    a = MNISTDataModule(data_root=str(data_root), seed=1, train_subset=2000)
    b = MNISTDataModule(data_root=str(data_root), seed=1, train_subset=2000)
    c = MNISTDataModule(data_root=str(data_root), seed=2, train_subset=2000)
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.data_val.images, b.data_val.images)
    assert not torch.equal(a.data_val.images, c.data_val.images)
    assert len(a.data_train) == 1800 and len(a.data_val) == 200
    for dm in (a, c):  # disjoint by index, together the whole source, and each split holds exactly its images
        train, val = dm.split_indices["train"], dm.split_indices["val"]
        assert not set(train.tolist()) & set(val.tolist())
        assert sorted(train.tolist() + val.tolist()) == list(range(2000))
        source, _ = dm.load_split(train=True)
        assert torch.equal(dm.data_val.images, source[:2000][val]) and torch.equal(dm.data_train.images, source[:2000][train])


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule, GTSRBDataModule])
def test_every_datamodule_takes_image_size(data_root, cls):
    """Tools pass ``image_size`` to whichever datamodule they load (the CIFAR-10 cGAN evaluation once broke here)."""
    dm = cls(data_root=str(data_root), image_size=24, test_subset=10)
    dm.setup("test")
    assert dm.data_test.images.shape == (10, cls.in_channels, 24, 24)
    assert dm.data_test.images.dtype == torch.uint8
    with pytest.raises(ValueError, match="image_size"):
        cls(data_root=str(data_root), image_size=4)


def test_load_images_at_native_size_for_every_dataset(data_root):
    from mixdefense.cli import load_images

    for name, channels, side in (("mnist", 1, 28), ("cifar10", 3, 32), ("gtsrb", 3, 32)):
        x, y = load_images(name, "test", 4, data_root=str(data_root), image_size=side)
        assert x.shape == (4, channels, side, side) and y.shape == (4,)


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule, GTSRBDataModule])
def test_missing_data_error_names_folder_and_files(tmp_path, cls):
    dm = cls(data_root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert str((tmp_path / "nowhere").resolve()) in msg
    assert str(dm.expected_files()[0]) in msg
    assert "download=True" in msg


def test_download_failure_is_reported_clearly(tmp_path, monkeypatch):
    dm = MNISTDataModule(data_root=str(tmp_path), download=True)

    def offline():
        raise OSError("network is unreachable")

    monkeypatch.setattr(dm, "fetch", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed: network is unreachable"):
        dm.prepare_data()


def test_gtsrb_grouped_validation_holds_whole_tracks_of_every_class(data_root):
    """val_grouping="groups": the validation split is whole sign tracks (from the file names), never a
    track shared with training, every class present, ~val_fraction of the images, seeded and in a
    random order; the default random split keeps its images (it cuts tracks)."""
    dm = GTSRBDataModule(data_root=str(data_root), val_grouping="groups")
    dm.setup("fit")
    groups = dm.train_groups()
    source, labels = dm.load_split(train=True)
    assert groups.shape == labels.shape and len(torch.unique(groups)) == 1307  # the 1,307 tracks of the training set
    assert torch.equal(groups // 10000, labels)  # a track lies within its class
    train, val = dm.split_indices["train"], dm.split_indices["val"]
    assert not set(groups[train].tolist()) & set(groups[val].tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert 0.09 < len(val) / len(labels) < 0.11
    assert len(torch.unique(labels[val])) == 43 and len(torch.unique(dm.data_val.labels[:2000])) >= 40
    assert torch.equal(dm.data_val.images, source[val])
    again = GTSRBDataModule(data_root=str(data_root), val_grouping="groups")
    again.setup("fit")
    assert torch.equal(again.split_indices["val"], val)
    plain = GTSRBDataModule(data_root=str(data_root))
    plain.setup("fit")
    shared = set(groups[plain.split_indices["train"]].tolist()) & set(groups[plain.split_indices["val"]].tolist())
    assert len(shared) > 1000  # the random split puts frames of almost every track on both sides


def test_grouped_validation_needs_groups_and_a_valid_setting(data_root):
    with pytest.raises(ValueError, match="val_grouping"):
        MNISTDataModule(val_grouping="tracks")
    dm = MNISTDataModule(data_root=str(data_root), val_grouping="groups", train_subset=500)
    with pytest.raises(ValueError, match="no groups"):
        dm.setup("fit")


def test_gtsrb_track_ids_come_from_the_file_names():
    from datamodules.gtsrb import track_id

    assert track_id("GTSRB/Training/00042/00007_00029.ppm", 42) == 420007
    assert track_id("x/00000_00000.ppm", 0) == 0
    with pytest.raises(ValueError, match="track"):
        track_id("GTSRB/Final_Test/Images/00012.ppm", 3)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        MNISTDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        MNISTDataModule(batch_size=0)
    with pytest.raises(ValueError, match="class_balance"):
        MNISTDataModule(class_balance=1.5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_class_balance_draws_classes_by_count_to_the_minus_alpha(data_root, alpha):
    dm = GTSRBDataModule(data_root=str(data_root), class_balance=alpha, batch_size=512, augment=False)
    dm.setup("fit")
    counts = torch.bincount(dm.data_train.labels, minlength=43).double()
    expected = counts.pow(1 - alpha) / counts.pow(1 - alpha).sum()  # share of each class in the draws
    loader = dm.train_dataloader()
    if alpha == 0:
        assert dm.class_balanced_sampler() is None and isinstance(loader.sampler, torch.utils.data.RandomSampler)
    else:
        assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler) and len(loader.sampler) == len(dm.data_train)
    torch.manual_seed(0)
    index = torch.tensor(list(loader.sampler)) if alpha else torch.arange(len(dm.data_train))
    labels = dm.data_train.labels[index]  # an epoch keeps its length
    drawn = torch.bincount(labels, minlength=43).double() / len(labels)
    assert (drawn - expected).abs().max() < 0.006
    if alpha == 1.0:  # rarest (210 images) and commonest (2,250) classes drawn equally often
        assert drawn.min() > 0.5 / 43 and drawn.max() < 1.5 / 43


def test_random_translate_is_a_shift_with_zero_fill():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    gen = torch.Generator().manual_seed(0)
    out = random_translate(x, pad=2, generator=gen)
    assert out.shape == x.shape
    for i in range(2):
        # every output is some shift of the input: compare against all 25 candidate shifts
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        shifts = [padded[:, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], s) for s in shifts)
    assert torch.equal(random_translate(x, pad=0), x)


def test_random_hflip_flips_some_images_exactly():
    x = torch.rand(64, 3, 4, 4)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_train_indices_give_each_training_image_its_position_and_survive_augmentation(data_root):
    dm = MNISTDataModule(data_root=str(data_root), train_subset=300, batch_size=64, train_indices=True, augment=True)
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and index.shape == (64,) and index.dtype == torch.long
    assert torch.equal(y, dm.data_train.labels[index])
    assert torch.equal(x, dm.data_train.images[index].float() / 255)
    assert len(next(iter(dm.val_dataloader()))) == 2  # only the training batches carry indices

    class Training:
        training = True

    dm.trainer = Training()
    shifted, y2, index2 = dm.on_after_batch_transfer((x, y, index), 0)
    assert torch.equal(y2, y) and torch.equal(index2, index) and shifted.shape == x.shape

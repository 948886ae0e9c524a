"""The protocol's three disjoint splits (mixdefense.splits): calibration, selection, test."""

from __future__ import annotations

import pytest
import torch

from mixdefense.splits import calibration_test_indices, check_disjoint_from_calibration, protocol_splits


def _check_partition(splits: dict, n: int) -> None:
    all_idx = torch.cat(list(splits.values()))
    assert len(all_idx) == n and torch.equal(all_idx.sort().values, torch.arange(n))  # complete and disjoint
    for idx in splits.values():
        assert torch.equal(idx, idx.sort().values)


def test_without_groups_the_selection_split_is_the_tail_of_the_test_set():
    s = protocol_splits(10000, {"selection": 2000})
    _check_partition(s, 10000)
    assert torch.equal(s["test"], torch.arange(8000)) and torch.equal(s["selection"], torch.arange(8000, 10000))
    assert len(s["calibration"]) == 0
    s = protocol_splits(100, {"selection": 20, "calibration": 10})
    _check_partition(s, 100)
    assert s["calibration"].tolist() == list(range(70, 80)) and s["test"].tolist() == list(range(70))


def test_with_groups_no_group_spans_two_splits():
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 300, (6000,), generator=g)  # ~20 images per group, scattered over the indices
    s = protocol_splits(6000, {"calibration": 1000, "selection": 1000}, groups, seed=0)
    _check_partition(s, 6000)
    owner = {}
    for name, idx in s.items():
        for grp in groups[idx].unique().tolist():
            assert owner.setdefault(grp, name) == name, f"group {grp} in {owner[grp]} and {name}"
    assert len(s["calibration"]) >= 1000 and len(s["selection"]) >= 1000 and len(s["test"]) >= 3000
    again = protocol_splits(6000, {"calibration": 1000, "selection": 1000}, groups, seed=0)
    assert all(torch.equal(again[k], s[k]) for k in s)  # seeded


@pytest.mark.parametrize("sizes", [{"selection": 600}, {"calibration": 300, "selection": 300}, {"test": 5}, {"selection": -1}])
def test_bad_sizes_are_refused(sizes):
    with pytest.raises(ValueError):
        protocol_splits(1000, sizes)


def test_evaluations_may_not_reach_the_calibration_images():
    record = {"split": "test_calibration", "test_indices": [7, 11, 900]}
    check_disjoint_from_calibration(record, torch.arange(7))  # images 0..6 are free
    with pytest.raises(ValueError, match="were calibration images"):
        check_disjoint_from_calibration(record, torch.arange(12))
    check_disjoint_from_calibration({"split": "val"}, torch.arange(10 ** 4))  # validation calibration: no constraint
    check_disjoint_from_calibration({"split": "val_groups"}, torch.arange(10 ** 4))  # held-out training groups: none either
    check_disjoint_from_calibration({}, torch.arange(10 ** 4))  # no recalibration recorded
    assert calibration_test_indices(record).tolist() == [7, 11, 900]
    with pytest.raises(ValueError, match="unknown calibration split"):
        check_disjoint_from_calibration({"split": "holdout", "test_indices": [0, 5]}, torch.arange(3))


def test_load_images_gives_the_protocol_splits(data_root):
    from mixdefense.cli import load_calibration_images, load_images

    x_all, y_all = load_images("mnist", "test_all", None, data_root=str(data_root))
    x, y = load_images("mnist", "test", 7, data_root=str(data_root))
    assert torch.equal(x, x_all[:7]) and torch.equal(y, y_all[:7])
    xs, ys = load_images("mnist", "selection", 5, data_root=str(data_root))
    assert torch.equal(xs, x_all[-2000:-1995])
    assert load_calibration_images("mnist", "val", 7, data_root=str(data_root))[2] == {"split": "val"}
    with pytest.raises(ValueError, match="calibration split"):
        load_calibration_images("mnist", "test", 7)
    with pytest.raises(ValueError, match="no test-set 'calibration' split"):
        load_calibration_images("mnist", "test_calibration", 7, data_root=str(data_root))


def test_held_out_sign_tracks_are_a_calibration_split(data_root):
    """``val_groups`` (GTSRB): the images of the datamodule's grouped validation split, the same through
    ``load_images`` and ``load_calibration_images``, none of them a training image of that split."""
    from datamodules.gtsrb import GTSRBDataModule
    from mixdefense.cli import load_calibration_images, load_images

    x, y, source = load_calibration_images("gtsrb", "val_groups", 50, data_root=str(data_root))
    assert source == {"split": "val_groups"} and x.shape == (50, 3, 32, 32)
    xi, yi = load_images("gtsrb", "val_groups", 50, data_root=str(data_root))
    assert torch.equal(x, xi) and torch.equal(y, yi)
    dm = GTSRBDataModule(data_root=str(data_root), val_grouping="groups")
    dm.setup("fit")
    assert torch.equal((x * 255).round().to(torch.uint8), dm.data_val.images[:50])
    plain, _ = load_images("gtsrb", "val", 50, data_root=str(data_root))
    assert not torch.equal(plain, x)

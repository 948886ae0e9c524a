"""The calibration hold-out (mixdefense.splits): the last test images, never reached by an evaluation."""

from __future__ import annotations

import pytest
import torch

from mixdefense.splits import check_disjoint_from_holdout, holdout_range


def test_holdout_is_the_tail_of_the_test_set():
    assert holdout_range(12630, 2000) == (10630, 12630)
    assert holdout_range(10, 5) == (5, 10)


@pytest.mark.parametrize("n", [None, 0, -1, 6])
def test_holdout_must_leave_half_the_test_set(n):
    with pytest.raises(ValueError, match="hold-out needs"):
        holdout_range(10, n)


def test_evaluations_may_not_reach_the_holdout():
    record = {"split": "holdout", "test_indices": [10630, 12630]}
    check_disjoint_from_holdout(record, 10630)  # the first 10,630 test images are free
    with pytest.raises(ValueError, match="overlap the calibration hold-out"):
        check_disjoint_from_holdout(record, 10631)
    check_disjoint_from_holdout({"split": "val"}, 10 ** 6)  # validation calibration: no constraint
    check_disjoint_from_holdout({}, 10 ** 6)  # no recalibration recorded


def test_load_images_holdout_returns_the_last_test_images(data_root):
    from mixdefense.cli import load_calibration_images, load_images

    x_all, y_all = load_images("mnist", "test", None, data_root=str(data_root))
    x, y = load_images("mnist", "holdout", 7, data_root=str(data_root))
    assert torch.equal(x, x_all[-7:]) and torch.equal(y, y_all[-7:])
    n = len(y_all)
    xc, yc, source = load_calibration_images("mnist", "holdout", 7, data_root=str(data_root))
    assert torch.equal(xc, x) and torch.equal(yc, y) and source == {"split": "holdout", "test_indices": [n - 7, n]}
    assert load_calibration_images("mnist", "val", 7, data_root=str(data_root))[2] == {"split": "val"}
    with pytest.raises(ValueError, match="calibration split"):
        load_calibration_images("mnist", "test", 7)

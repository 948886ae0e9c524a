"""``benchmarks/calibration_shift.py``: thresholds from one clean split measured on another (synthetic scores; fast).

The script is loaded from its file (it is not part of the package): ``benchmark_scripts.load_benchmark``.
"""

from __future__ import annotations


import pytest
import torch

from benchmark_scripts import load_benchmark

cs = load_benchmark("calibration_shift")


def _set(scores, correct=None, labels=None):
    scores = torch.as_tensor(scores, dtype=torch.float32)
    correct = torch.ones_like(scores, dtype=torch.bool) if correct is None else torch.as_tensor(correct)
    labels = torch.zeros(scores.numel(), dtype=torch.long) if labels is None else torch.as_tensor(labels)
    return scores, correct, labels


def test_thresholds_come_from_the_correctly_classified_calibration_images_only():
    # calibration: 100 correct images scoring 0..0.99 and one misclassified outlier that must not move the threshold
    cal = _set([*(i / 100 for i in range(100)), 50.0], [True] * 100 + [False])
    new = _set([i / 100 for i in range(100)])
    rows = cs.shift_report({"val": cal, "selection": new}, ["val"], ["selection"], [0.05])
    (row,) = rows
    assert row["threshold"] == pytest.approx(torch.tensor([i / 100 for i in range(100)]).quantile(0.95).item())
    assert row["frr_val"] == pytest.approx(0.05) and row["frr_selection"] == pytest.approx(0.05)


def test_a_shifted_split_shows_the_drift_and_misclassified_images_are_not_counted():
    cal = _set([i / 100 for i in range(100)])
    shifted = _set([0.5 + i / 100 for i in range(100)] + [10.0] * 20, [True] * 100 + [False] * 20)
    rows = cs.shift_report({"val": cal, "selection": shifted}, ["val"], ["selection"], [0.01, 0.05])
    for row in rows:
        # the half of the shifted scores above 0.95 / 0.99 (the 20 misclassified outliers are left out)
        assert row["frr_selection"] == pytest.approx((torch.arange(100) / 100 + 0.5 > row["threshold"]).float().mean().item())
        assert row["frr_selection"] > 0.5  # half the shifted images lie above either threshold
    assert [r["target_frr"] for r in rows] == [0.01, 0.05] and rows[0]["threshold"] > rows[1]["threshold"]


def test_every_calibration_split_gets_its_rows():
    a, b = _set(torch.linspace(0, 1, 50)), _set(torch.linspace(0, 2, 50))
    rows = cs.shift_report({"val": a, "val_groups": b, "selection": a}, ["val", "val_groups"], ["selection"], [0.1])
    assert [r["calibration"] for r in rows] == ["val", "val_groups"]
    assert rows[0]["frr_selection"] == pytest.approx(rows[0]["frr_val"])
    assert rows[1]["frr_selection"] < rows[1]["target_frr"]  # a stricter split's threshold rejects fewer of the others


def test_the_class_mix_prediction_explains_a_shift_of_class_mix_and_not_a_shift_within_classes():
    # class 0 scores low, class 1 high; calibration holds 90 % class 0, the new split 50 %: same scores per class
    low, high = [i / 100 for i in range(100)], [1 + i / 100 for i in range(100)]
    cal = _set(low * 9 + high, labels=[0] * 900 + [1] * 100)
    mix = _set(low + high, labels=[0] * 100 + [1] * 100)
    (row,) = cs.shift_report({"val": cal, "selection": mix}, ["val"], ["selection"], [0.05])
    assert row["frr_selection"] > 2 * row["target_frr"]  # the threshold drifts...
    assert row["class_mix_frr_selection"] == pytest.approx(row["frr_selection"])  # ...and the class mix says why
    # the same class mix but every class scoring higher: the prediction stays at the calibration's rate
    shifted = _set([v + 1.0 for v in low * 9 + high], labels=[0] * 900 + [1] * 100)
    (row,) = cs.shift_report({"val": cal, "selection": shifted}, ["val"], ["selection"], [0.05])
    assert row["class_mix_frr_selection"] == pytest.approx(row["frr_val"]) and row["frr_selection"] > 0.3
    # a class the calibration images lack has no prediction
    (row,) = cs.shift_report({"val": cal, "selection": _set(low, labels=[2] * 100)}, ["val"], ["selection"], [0.05])
    assert row["class_mix_frr_selection"] is None

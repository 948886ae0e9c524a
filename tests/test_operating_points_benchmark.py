"""``benchmarks/operating_points.py``: bundles judged on the same AEs (the shipped MNIST bundle; fast).

The script is loaded from its file (it is not part of the package).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("operating_points_benchmark", REPO / "benchmarks/operating_points.py")
op = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(op)


def test_judge_gives_the_bundles_own_verdict_and_a_score_above_one_exactly_where_it_rejects():
    from mixdefense.pipeline import load_detector

    detector = load_detector(REPO / "artifacts/mnist/detector.pt")
    torch.manual_seed(0)
    x = torch.cat([torch.rand(6, 1, 28, 28), torch.zeros(6, 1, 28, 28)])  # noise (SAEC) and blank images
    labels, rejected, score = op.judge(detector, x, batch=5)
    verdict = detector.detect(x)
    assert torch.equal(rejected, verdict.rejected)
    assert torch.equal(score > 1, rejected)
    assert torch.equal(labels[~rejected], verdict.labels[~rejected])


def test_summary_takes_the_mean_and_the_worst_point_over_points_with_successful_aes():
    points = [{"attack": "fgsm", "eps": 0.01, "num_successful": 10, "acc_detector": 0.9, "detection_rate": 0.85, "auroc": 0.95},
              {"attack": "pgd_linf", "eps": 0.02, "num_successful": 5, "acc_detector": 0.7, "detection_rate": 0.45, "auroc": 0.9},
              {"attack": "pgd_l2", "eps": 0.25, "num_successful": 0, "acc_detector": math.nan, "detection_rate": math.nan,
               "auroc": math.nan}]
    s = op.summarise(points)
    assert s["points"] == 2 and s["mean_acc_detector"] == pytest.approx(0.8)
    assert s["min_acc_detector"] == pytest.approx(0.7) and s["min_point"].startswith("pgd_linf")
    assert s["mean_detection_rate"] == pytest.approx(0.65) and s["mean_auroc"] == pytest.approx(0.925)

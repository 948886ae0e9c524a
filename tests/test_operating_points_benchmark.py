"""``benchmarks/operating_points.py``: bundles judged on the same AEs (the shipped MNIST bundle; fast).

The script is loaded from its file (it is not part of the package): ``benchmark_scripts.load_benchmark``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]
op = load_benchmark("operating_points")


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


def test_last_layer_cut_rejects_the_rate_together_with_the_earlier_layers():
    # 100 clean images: SAEC (row 0) rejects 2 of them; ContraNet's margins (row 1) are 0.00 .. 0.99
    m = torch.stack([torch.zeros(100), torch.arange(100) / 100])
    m[0, :2] = 5.0
    cut = op.last_layer_cut(m, 0.05)
    rejected = (m[0] > 1) | (m[1] > cut)
    assert int(rejected.sum()) == 5  # 2 by SAEC, 3 more by ContraNet
    assert op.last_layer_cut(m, 0.01) == float("inf")  # SAEC alone already rejects 2 %: ContraNet rejects nothing
    assert int(((m[0] > 1) | (m[1] > op.last_layer_cut(m, 0.02))).sum()) == 2

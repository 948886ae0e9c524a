"""Eqs. 7–8 and the ROC summaries on hand-made verdicts."""

from __future__ import annotations

import pytest
import torch

from mixdefense.metrics import (
    acc_detector,
    acc_robust_classifier,
    detection_auroc,
    tpr_at_fpr,
)

T, F = True, False


def test_acc_detector_is_tp_plus_tn_over_all():
    clean_rejected = torch.tensor([F, F, F, T])  # TP = 3, FN = 1
    adv_rejected = torch.tensor([T, T, F, F])  # TN = 2, FP = 2
    assert acc_detector(clean_rejected, adv_rejected) == pytest.approx(5 / 8)
    assert acc_detector(torch.tensor([F, F]), torch.tensor([T, T])) == 1.0
    assert acc_detector(torch.tensor([T, T]), torch.tensor([F, F])) == 0.0


def test_acc_rc_counts_detected_or_correct_once():
    rejected = torch.tensor([T, F, F, T, F])
    correct = torch.tensor([F, T, F, T, F])  # the 4th is both: counted once
    assert acc_robust_classifier(rejected, correct) == pytest.approx(3 / 5)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="bool"):
        acc_detector(torch.tensor([0, 1]), torch.tensor([T]))
    with pytest.raises(ValueError, match="shape"):
        acc_robust_classifier(torch.tensor([T]), torch.tensor([T, F]))
    with pytest.raises(ValueError, match="no AEs"):
        acc_robust_classifier(torch.tensor([], dtype=torch.bool), torch.tensor([], dtype=torch.bool))


def test_auroc_and_tpr_at_fpr():
    clean = torch.arange(100, dtype=torch.float32)  # 0..99
    adv = torch.arange(50, 150, dtype=torch.float32)  # 50..149
    # P(adv > clean) with ties counted 1/2
    expected = ((adv[:, None] > clean[None]).float() + 0.5 * (adv[:, None] == clean[None]).float()).mean().item()
    assert detection_auroc(clean, adv) == pytest.approx(expected, abs=1e-6)
    # at ≤ 5 % clean rejection the threshold sits above 94: adv 95..149 detected = 55 %
    assert tpr_at_fpr(clean, adv, 0.05) == pytest.approx(0.55, abs=0.011)
    assert detection_auroc(torch.zeros(10), torch.ones(10)) == 1.0


def test_wilson_interval_covers_about_95_percent_on_a_simulated_binomial():
    """2,000 draws of Binomial(n, p) for a few (n, p), small n and extreme p included: the interval
    contains p in 93–98.5 % of the draws (Wilson's coverage; a normal approximation falls far short
    at p = 0.02, n = 30)."""
    from mixdefense.metrics import wilson_interval

    g = torch.Generator().manual_seed(0)
    for n, p in [(30, 0.02), (30, 0.5), (100, 0.9), (500, 0.97)]:
        ks = torch.binomial(torch.full((2000,), float(n)), torch.full((2000,), p), generator=g).int().tolist()
        cover = sum(lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in ks)) / len(ks)
        assert 0.93 <= cover <= 0.985, (n, p, cover)


def test_wilson_interval_edges():
    from mixdefense.metrics import wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.65 < lo < 0.8
    assert all(v != v for v in wilson_interval(0, 0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_every_point_rate_carries_its_interval():
    from mixdefense.evaluation.points import RATES, point_metrics

    success = torch.tensor([True, True, False, True])
    clean_rejected = torch.tensor([False, False, False, True, False])  # the fixed clean set: 1 of 5 rejected
    m = point_metrics(success, ~success, torch.ones(4), torch.tensor([True, False, False, True]), torch.rand(4),
                      clean_rejected, torch.rand(5))
    for rate in RATES:
        assert m[f"{rate}_ci_low"] <= m[rate] <= m[f"{rate}_ci_high"], rate
    assert m["detection_rate"] == pytest.approx(2 / 3) and m["clean_rejection_rate"] == pytest.approx(1 / 5)
    # Acc_detector: the mean of the clean acceptance (4/5) and the detection rate (2/3)
    assert m["acc_detector"] == pytest.approx((4 / 5 + 2 / 3) / 2) and m["num_clean"] == 5


def test_acc_detector_clean_half_is_the_fixed_clean_set():
    """The clean half does not depend on which AEs succeeded: two points with the same detection rate
    but different successful originals give the same Acc_detector."""
    from mixdefense.evaluation.points import point_metrics

    clean_rejected, clean_score = torch.tensor([True] + [False] * 9), torch.rand(10)
    a = point_metrics(torch.tensor([True, False]), torch.tensor([False, True]), torch.ones(2), torch.tensor([True, False]),
                      torch.rand(2), clean_rejected, clean_score)
    b = point_metrics(torch.tensor([False, True]), torch.tensor([True, False]), torch.ones(2), torch.tensor([False, True]),
                      torch.rand(2), clean_rejected, clean_score)
    assert a["acc_detector"] == b["acc_detector"] == pytest.approx((0.9 + 1.0) / 2)
    assert a["clean_rejection_rate"] == b["clean_rejection_rate"] == pytest.approx(0.1)


@pytest.mark.parametrize("p1,p2,n", [(0.9, 0.5, 40), (0.99, 0.2, 200), (0.95, 0.95, 100)])
def test_intervals_cover_on_simulated_binomials(p1, p2, n):
    """Wilson (one rate) and MOVER (the mean of two, Acc_detector) 95 % intervals cover the truth in
    ≈ 95 % of simulated experiments (2,000 draws: the coverage estimate's own 99 % band is ±1.3 points)."""
    from mixdefense.metrics import mean_of_rates_interval, wilson_interval

    g = torch.Generator().manual_seed(0)
    k1 = torch.binomial(torch.full((2000,), float(n)), torch.full((2000,), p1), generator=g).int().tolist()
    k2 = torch.binomial(torch.full((2000,), float(n)), torch.full((2000,), p2), generator=g).int().tolist()
    wilson = sum(lo <= p1 <= hi for lo, hi in (wilson_interval(k, n) for k in k1)) / 2000
    mover = sum(lo <= (p1 + p2) / 2 <= hi for lo, hi in (mean_of_rates_interval(a, n, b, n) for a, b in zip(k1, k2))) / 2000
    assert 0.925 <= wilson <= 0.985, wilson
    assert 0.925 <= mover <= 0.985, mover

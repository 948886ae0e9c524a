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

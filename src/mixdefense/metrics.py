"""Detection metrics of the paper (§5.1, eqs. 7–8) and the usual ROC summaries.

Conventions: a *rejected* input is one the detector flags as adversarial.  Clean images
are the positive class of eq. 7 (a clean image accepted is a true positive; an AE
rejected is a true negative).
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc


def _bool(t: torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor, got {t.dtype}")
    return t.flatten()


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a rate ``k / n`` (default 95 %); ``(nan, nan)`` when ``n = 0``.

    Well-behaved at 0 and 1 and for small ``n`` (unlike the normal approximation), which is what
    sparse budget points need: a point with few AEs gets a wide interval, not a dropped row.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_of_rates_interval(k1: int, n1: int, k2: int, n2: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % interval of ``(k1/n1 + k2/n2) / 2``, the mean of two independent rates (Acc_detector with a
    fixed clean half): Newcombe–Zou's MOVER from the two Wilson intervals; ``(nan, nan)`` if a rate is empty.

    ``low = p − ½·√((p₁ − l₁)² + (p₂ − l₂)²)``, ``high = p + ½·√((u₁ − p₁)² + (u₂ − p₂)²)``.
    """
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    (l1, u1), (l2, u2) = wilson_interval(k1, n1, z), wilson_interval(k2, n2, z)
    p1, p2 = k1 / n1, k2 / n2
    p = (p1 + p2) / 2
    return (max(0.0, p - 0.5 * math.hypot(p1 - l1, p2 - l2)), min(1.0, p + 0.5 * math.hypot(u1 - p1, u2 - p2)))


def acc_detector(clean_rejected: torch.Tensor, adv_rejected: torch.Tensor) -> float:
    """Eq. 7: ``(TP + TN) / (TP + TN + FP + FN)`` on clean images and successful AEs.

    TP = clean accepted, FN = clean rejected, TN = AE rejected, FP = AE accepted.  The
    paper uses a half-and-half mixture; pass equally many of each for that reading.
    """
    c, a = _bool(clean_rejected, "clean_rejected"), _bool(adv_rejected, "adv_rejected")
    if c.numel() + a.numel() == 0:
        raise ValueError("acc_detector: no images")
    tp, tn = (~c).sum().item(), a.sum().item()
    return (tp + tn) / (c.numel() + a.numel())


def acc_robust_classifier(adv_rejected: torch.Tensor, adv_correct: torch.Tensor) -> float:
    """Eq. 8: share of *all* AEs (successful or not) that are detected or correctly classified.

    ``adv_correct``: the classifier's label on the AE equals the true label.  An AE that
    is both rejected and correctly classified counts once, so the value lies in [0, 1].
    """
    r, ok = _bool(adv_rejected, "adv_rejected"), _bool(adv_correct, "adv_correct")
    if r.shape != ok.shape:
        raise ValueError(f"adv_rejected and adv_correct differ in shape: {tuple(r.shape)} vs {tuple(ok.shape)}")
    if r.numel() == 0:
        raise ValueError("acc_robust_classifier: no AEs")
    return (r | ok).float().mean().item()


def to_unit_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Map scores monotonically (ties kept) onto [0, 1] by their dense rank.

    torchmetrics applies a sigmoid to predictions outside [0, 1], which saturates in
    floating point (all large scores become 1.0, i.e. false ties); ranks avoid that and
    leave every ROC quantity unchanged.
    """
    uniq, inv = torch.unique(scores.flatten(), return_inverse=True)
    return inv.double() / max(len(uniq) - 1, 1)


def detection_auroc(clean_scores: torch.Tensor, adv_scores: torch.Tensor) -> float:
    """AUROC of telling AEs (positive here) from clean images, larger score = more adversarial."""
    scores = to_unit_ranks(torch.cat([clean_scores.flatten(), adv_scores.flatten()]).double())
    target = torch.cat([torch.zeros(clean_scores.numel()), torch.ones(adv_scores.numel())]).long()
    return float(binary_auroc(scores, target))


def tpr_at_fpr(clean_scores: torch.Tensor, adv_scores: torch.Tensor, fpr: float = 0.05) -> float:
    """Share of AEs detected at the threshold that rejects at most ``fpr`` of the clean images."""
    scores = to_unit_ranks(torch.cat([clean_scores.flatten(), adv_scores.flatten()]).double())
    target = torch.cat([torch.zeros(clean_scores.numel()), torch.ones(adv_scores.numel())]).long()
    f, t, _ = binary_roc(scores, target)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0

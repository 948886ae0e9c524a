"""The metrics of one (attack, ε) point, defined once for every evaluation in the project.

Inputs, one entry per AE made from a correctly classified clean image (``[N]`` each):
``success`` (the AE fools the classifier), ``correct_adv`` (the defended system's label on the AE
is the true one), ``norm`` (the measured perturbation, [0, 1] pixel units), whether the defense
rejects the AE / its clean original, and the defense's scores on both (larger = more adversarial).

* ``attack_success_rate`` — successful AEs / AEs;
* ``detection_rate`` — rejected successful AEs / successful AEs;
* ``clean_rejection_rate`` — rejected clean originals of the successful AEs;
* ``acc_detector`` — paper eq. 7 on the successful AEs and their originals (half and half);
* ``acc_rc`` — paper eq. 8 over *all* AEs: (rejected + still correctly labelled) / AEs;
* ``auroc`` and ``tpr_at_5fpr`` — scores of the successful AEs against their originals;
* ``mean_norm`` — the successful AEs' mean perturbation.

Rates are in ``[0, 1]``; a rate with nothing to count is ``nan``.  Every rate ``r`` comes with its 95 %
Wilson interval ``r_ci_low`` / ``r_ci_high`` (:func:`mixdefense.metrics.wilson_interval`); for
``acc_detector`` the ``2 n`` clean and adversarial outcomes are counted as one sample of size ``2 n``.
"""

from __future__ import annotations

import math

import torch

from mixdefense.metrics import (
    acc_detector,
    acc_robust_classifier,
    detection_auroc,
    tpr_at_fpr,
    wilson_interval,
)

RATES = ("attack_success_rate", "detection_rate", "clean_rejection_rate", "acc_detector", "acc_rc")
METRICS = ("num_aes", "num_successful", *RATES, "auroc", "tpr_at_5fpr", "mean_norm",
           *(f"{r}_ci_{end}" for r in RATES for end in ("low", "high")))


def point_metrics(success: torch.Tensor, correct_adv: torch.Tensor, norm: torch.Tensor, adv_rejected: torch.Tensor,
                  clean_rejected: torch.Tensor, adv_score: torch.Tensor, clean_score: torch.Tensor) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one defense at one point (see the module docstring)."""
    success, correct_adv = success.bool().cpu(), correct_adv.bool().cpu()
    adv_rejected, clean_rejected = adv_rejected.bool().cpu(), clean_rejected.bool().cpu()
    adv_score, clean_score, norm = adv_score.float().cpu(), clean_score.float().cpu(), norm.float().cpu()
    n, n_succ = len(success), int(success.sum())
    r = {"num_aes": n, "num_successful": n_succ, "attack_success_rate": n_succ / n if n else math.nan,
         "detection_rate": math.nan, "clean_rejection_rate": math.nan, "acc_detector": math.nan,
         "acc_rc": acc_robust_classifier(adv_rejected, correct_adv) if n else math.nan,
         "auroc": math.nan, "tpr_at_5fpr": math.nan, "mean_norm": float(norm[success].mean()) if n_succ else math.nan}
    counts = {"attack_success_rate": (n_succ, n), "acc_rc": (int((adv_rejected | correct_adv).sum()), n),
              "detection_rate": (0, 0), "clean_rejection_rate": (0, 0), "acc_detector": (0, 0)}
    if n_succ:
        s = success
        r.update(detection_rate=float(adv_rejected[s].float().mean()),
                 clean_rejection_rate=float(clean_rejected[s].float().mean()),
                 acc_detector=acc_detector(clean_rejected[s], adv_rejected[s]),
                 auroc=detection_auroc(clean_score[s], adv_score[s]),
                 tpr_at_5fpr=tpr_at_fpr(clean_score[s], adv_score[s], 0.05))
        rejected_adv, rejected_clean = int(adv_rejected[s].sum()), int(clean_rejected[s].sum())
        counts.update(detection_rate=(rejected_adv, n_succ), clean_rejection_rate=(rejected_clean, n_succ),
                      acc_detector=(n_succ - rejected_clean + rejected_adv, 2 * n_succ))
    for rate, (k, total) in counts.items():
        r[f"{rate}_ci_low"], r[f"{rate}_ci_high"] = wilson_interval(k, total)
    return r

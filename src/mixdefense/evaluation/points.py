"""The metrics of one (attack, ε) point, defined once for every evaluation in the project.

Inputs, one entry per AE made from a correctly classified clean image (``[N]`` each):
``success`` (the AE fools the classifier), ``correct_adv`` (the defended system's label on the AE
is the true one), ``norm`` (the measured perturbation, [0, 1] pixel units), whether the deployed
defense rejects the AE, and its score on it (larger = more adversarial).  The clean side is the
**fixed clean evaluation set** (``[M]``: the correctly classified clean test images, the same
for every point): whether the defense rejects each, and its score.

* ``attack_success_rate`` — successful AEs / AEs;
* ``detection_rate`` — rejected successful AEs / successful AEs (the deployed threshold);
* ``clean_rejection_rate`` — rejected images of the fixed clean set (the same at every point);
* ``acc_detector`` — paper eq. 7 as the mean of the clean half (1 − clean rejection) and the
  adversarial half (detection rate): the clean half does not swing with ε;
* ``acc_rc`` — paper eq. 8 over *all* AEs: (rejected + still correctly labelled) / AEs;
* ``auroc`` — scores of the successful AEs against the fixed clean set (threshold-free);
* ``mean_norm`` — the successful AEs' mean perturbation.

Rates are in ``[0, 1]``; a rate with nothing to count is ``nan``.  Every rate ``r`` comes with its 95 %
interval ``r_ci_low`` / ``r_ci_high``: Wilson (:func:`mixdefense.metrics.wilson_interval`), and for
``acc_detector``, a mean of two independent rates, Newcombe–Zou's MOVER
(:func:`mixdefense.metrics.mean_of_rates_interval`).
"""

from __future__ import annotations

import math

import torch

from mixdefense.metrics import (
    acc_robust_classifier,
    detection_auroc,
    mean_of_rates_interval,
    wilson_interval,
)

RATES = ("attack_success_rate", "detection_rate", "clean_rejection_rate", "acc_detector", "acc_rc")
METRICS = ("num_aes", "num_successful", "num_clean", *RATES, "auroc", "mean_norm",
           *(f"{r}_ci_{end}" for r in RATES for end in ("low", "high")))


def point_metrics(success: torch.Tensor, correct_adv: torch.Tensor, norm: torch.Tensor, adv_rejected: torch.Tensor,
                  adv_score: torch.Tensor, clean_rejected: torch.Tensor, clean_score: torch.Tensor) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one defense at one point (see the module docstring).

    ``success``, ``correct_adv``, ``norm``, ``adv_rejected``, ``adv_score``: ``[N]`` per AE;
    ``clean_rejected``, ``clean_score``: ``[M]`` over the fixed clean evaluation set.
    """
    success, correct_adv = success.bool().cpu(), correct_adv.bool().cpu()
    adv_rejected, clean_rejected = adv_rejected.bool().cpu(), clean_rejected.bool().cpu()
    adv_score, clean_score, norm = adv_score.float().cpu(), clean_score.float().cpu(), norm.float().cpu()
    n, n_succ, m = len(success), int(success.sum()), len(clean_rejected)
    k_clean_ok = m - int(clean_rejected.sum())
    r = {"num_aes": n, "num_successful": n_succ, "num_clean": m,
         "attack_success_rate": n_succ / n if n else math.nan,
         "detection_rate": math.nan, "clean_rejection_rate": (m - k_clean_ok) / m if m else math.nan,
         "acc_detector": math.nan, "acc_rc": acc_robust_classifier(adv_rejected, correct_adv) if n else math.nan,
         "auroc": math.nan, "mean_norm": float(norm[success].mean()) if n_succ else math.nan}
    counts = {"attack_success_rate": (n_succ, n), "acc_rc": (int((adv_rejected | correct_adv).sum()), n),
              "detection_rate": (0, 0), "clean_rejection_rate": (m - k_clean_ok, m)}
    k_det = int(adv_rejected[success].sum())
    if n_succ:
        r["detection_rate"] = k_det / n_succ
        counts["detection_rate"] = (k_det, n_succ)
        if m:
            r["acc_detector"] = (k_clean_ok / m + k_det / n_succ) / 2
            r["auroc"] = detection_auroc(clean_score, adv_score[success])
    for rate, (k, total) in counts.items():
        r[f"{rate}_ci_low"], r[f"{rate}_ci_high"] = wilson_interval(k, total)
    r["acc_detector_ci_low"], r["acc_detector_ci_high"] = mean_of_rates_interval(k_clean_ok, m, k_det, n_succ)
    return r

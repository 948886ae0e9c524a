"""The protocol's calibration: thresholds from *correctly classified* clean images at one false-rejection rate.

Rejecting a clean image the classifier gets wrong costs no accuracy (it is a catch, not a false
rejection), but such images sit at the top of a detector's clean score tail: counted in the
calibration they drag every threshold up.  So every detector of this project is calibrated on
the correctly classified images of the calibration split only, and every compared detector at
the same rate (``experiments/<ds>/detector.yaml``: ``target_frr``).

* :func:`calibrate_composite` — MixDefense: the layers before the last keep their thresholds
  (SAEC's comes from noise, the paper's calibration), the last one (ContraNet) takes what is left
  of the budget, so the composite rejects ``≤ target_frr`` of the calibration images.
* :func:`margin_cutoffs` — the same rule on precomputed margins, for evaluations that report a
  detector at several rates without recalibrating its file.
"""

from __future__ import annotations

import torch

from mixdefense.layers.thresholds import or_calibrate


def calibration_record(y: torch.Tensor, pred: torch.Tensor) -> dict:
    """How many calibration images there were and how many of them the classifier got right / wrong."""
    ok = pred == y
    return {"images": len(y), "correctly_classified": int(ok.sum()), "misclassified": int((~ok).sum())}


@torch.no_grad()
def calibrate_composite(detector, x: torch.Tensor, y: torch.Tensor, target_frr: float, batch_size: int = 250) -> dict:
    """Calibrate a :class:`~mixdefense.pipeline.MixDefense` whose last layer is ContraNet.

    Args:
        detector: the bundle (its earlier layers already calibrated, e.g. SAEC from noise).
        x: clean calibration images ``[N, C, H, W]`` in ``[0, 1]``; y: their true labels ``[N]``.
        target_frr: the composite's clean false-rejection rate on the correctly classified images.

    Returns the record: counts (:func:`calibration_record`), the earlier layers' rejection of the
    correctly classified images, ContraNet's calibration and the composite's achieved rate.
    """
    pred = detector.classifier.predict(x)
    ok = pred == y
    if not ok.any():
        raise ValueError("no calibration image is classified correctly: nothing to calibrate on")
    xs, ys = x[ok], pred[ok]
    *earlier, last = detector.layers
    if not hasattr(last, "calibrate_from_table"):
        raise TypeError(f"the last layer must be ContraNet-like (calibrate_from_table), got {type(last).__name__}")
    earlier_rejects = {det.name: torch.cat([(det.margin(xb) if det.kind == "pre" else det.margin(xb, yb)).cpu() > 1
                                            for xb, yb in zip(xs.split(batch_size), ys.split(batch_size))])
                       for det in earlier}
    prior = torch.stack(list(earlier_rejects.values())).any(0) if earlier else torch.zeros(len(ys), dtype=torch.bool)
    parts = last.score_table(xs, ys, batch_size)  # ContraNet scores the images once
    cal = last.calibrate_from_table(parts, target_frr, rejected=prior)
    final = torch.stack([parts[s] > t for s, t in zip(cal.scores, cal.thresholds)], 1).any(1)
    return {**calibration_record(y, pred), **cal.as_dict(),
            "earlier_layers_frr": {name: float(r.double().mean()) for name, r in earlier_rejects.items()},
            "composite_frr": float((final | prior).double().mean())}


def margin_cutoffs(margins: torch.Tensor, target_frr: float, fixed: int = 0) -> torch.Tensor:
    """Cut-offs ``[L]`` on margins ``[N, L]`` of clean, correctly classified calibration images.

    The first ``fixed`` columns keep their deployed cut (1: a margin ``> 1`` rejects); the others
    are cut together (:func:`~mixdefense.layers.thresholds.or_calibrate`) so that the OR of all
    columns rejects ``≤ target_frr`` of the rows.  ``fixed=0`` with one column is a single
    detector calibrated alone.  A row is rejected where ``margins > cutoffs`` in some column.
    """
    if margins.dim() != 2 or not 0 <= fixed < margins.shape[1]:
        raise ValueError(f"margins must be [N, L] with 0 <= fixed < L, got {tuple(margins.shape)}, fixed={fixed}")
    prior = (margins[:, :fixed] > 1).any(1)
    cut, _ = or_calibrate(margins[:, fixed:], target_frr, rejected=prior)
    return torch.cat([torch.ones(fixed), cut.float()])

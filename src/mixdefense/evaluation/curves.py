"""Budget sweeps of one detector (SAEC, ContraNet variants): AEs per budget, metrics per point.

The protocol (paper §5.1–5.2): AEs are made from test images the classifier gets right;
for each (attack, ε) the detection rate of the *successful* AEs (classified wrongly) and the
clean rejection of the fixed clean set — all the correctly classified images attacked, the
same at every ε — make ``Acc_detector`` (eq. 7, half and half); ``Acc_RC`` (eq. 8) counts all AEs.
A point with fewer than ``min_successes`` successful AEs is marked sparse (``kept`` False; the
paper dropped them below 100); its rates still carry their 95 % intervals.

A *detector* here is any callable ``detector(x) -> (rejected bool [B], score float [B])``
on images in ``[0, 1]``, where a larger score means "more adversarial".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mixdefense.attacks import get_attack, perturbation_norm, run_sweep
from mixdefense.evaluation import points

Detector = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

#: Default budget grids, [0, 1] pixel units (L2: over the whole image).
LINF_BUDGETS = tuple(e / 255 for e in (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 56, 64))
L2_BUDGETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Labels ``[B]`` predicted by ``model`` (eval mode), in batches."""
    model.eval()
    return torch.cat([model(c).argmax(1) for c in x.split(batch_size)])


def correctly_classified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of ``(x, y)`` that ``model`` classifies correctly."""
    keep = predict(model, x) == y
    xs, ys = x[keep], y[keep]
    return (xs[:n], ys[:n]) if n is not None else (xs, ys)


@dataclass
class PointResult:
    """Metrics of one (attack, ε) point.  Rates in [0, 1]; ``eps`` in [0, 1] pixel units."""

    attack: str
    norm: str
    eps: float
    num_aes: int
    num_successful: int
    num_clean: int  # the fixed clean set: the correctly classified images that were attacked
    attack_success_rate: float
    kept: bool  # False when num_successful < min_successes (the paper's rule)
    detection_rate: float = float("nan")  # rejected successful AEs / successful AEs
    clean_rejection_rate: float = float("nan")  # on the fixed clean set (the same at every ε)
    acc_detector: float = float("nan")
    acc_rc: float = float("nan")
    auroc: float = float("nan")
    mean_norm: float = float("nan")  # measured perturbation of the successful AEs
    # 95 % intervals of the rates (mixdefense.evaluation.points)
    attack_success_rate_ci_low: float = float("nan")
    attack_success_rate_ci_high: float = float("nan")
    detection_rate_ci_low: float = float("nan")
    detection_rate_ci_high: float = float("nan")
    clean_rejection_rate_ci_low: float = float("nan")
    clean_rejection_rate_ci_high: float = float("nan")
    acc_detector_ci_low: float = float("nan")
    acc_detector_ci_high: float = float("nan")
    acc_rc_ci_low: float = float("nan")
    acc_rc_ci_high: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def point_metrics(
    attack: str, norm: str, eps: float, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
    pred_adv: torch.Tensor, detector: Detector, min_successes: int = 100,
    clean_verdict: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> PointResult:
    """Metrics of ``detector`` on the AEs ``x_adv`` made from correctly classified ``(x, y)``
    (:func:`mixdefense.evaluation.points.point_metrics`)."""
    success = pred_adv != y
    adv_rej, adv_score = detector(x_adv)
    clean_rej, clean_score = clean_verdict if clean_verdict is not None else detector(x)
    m = points.point_metrics(success, pred_adv == y, perturbation_norm(x_adv, x, norm), adv_rej, adv_score,
                             clean_rej, clean_score)
    return PointResult(attack, norm, float(eps), kept=m["num_successful"] >= min_successes, **m)


def budget_curve(
    model: nn.Module, detector: Detector, attack: str, x: torch.Tensor, y: torch.Tensor,
    budgets: Sequence[float] | None = None, batch_size: int = 250, min_successes: int = 100,
    progress: bool = True, **attack_kwargs,
) -> list[PointResult]:
    """Run ``attack`` over ``budgets`` on correctly classified ``(x, y)``; metrics per budget."""
    spec = get_attack(attack)
    if not spec.budgeted:
        raise ValueError(f"{attack} has no budget: it is a minimum-norm attack (see lightning_modules.evaluation)")
    budgets = tuple(budgets) if budgets is not None else (LINF_BUDGETS if spec.norm == "linf" else L2_BUDGETS)
    advs: list[list[torch.Tensor]] = [[] for _ in budgets]
    chunks = list(zip(x.split(batch_size), y.split(batch_size)))
    for xb, yb in tqdm(chunks, desc=f"{attack}: {len(budgets)} budgets", disable=not progress, leave=False):
        for i, xa in enumerate(run_sweep(attack, model, xb, yb, budgets, **attack_kwargs)):
            advs[i].append(xa)
    clean_verdict = detector(x)
    out = []
    for eps, parts in zip(budgets, advs):
        x_adv = torch.cat(parts)
        out.append(point_metrics(attack, spec.norm, eps, x, y, x_adv, predict(model, x_adv), detector, min_successes, clean_verdict))
    return out

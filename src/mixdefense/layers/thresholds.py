"""Thresholds from clean scores, shared by the layers that OR several scores (ContraNet, MagNet)."""

from __future__ import annotations

import torch


def or_calibrate(scores: torch.Tensor, target_frr: float, iterations: int = 40) -> tuple[torch.Tensor, float]:
    """Thresholds ``[K]`` for an OR of ``K`` scores ``[N, K]`` with combined clean rejection ``≤ target_frr``.

    Every score is cut at its ``1 − q`` quantile (``'higher'``, so ``P(s > t) ≤ q``), with the
    largest ``q ∈ [0, target_frr]`` (bisection) whose OR still rejects ``≤ target_frr`` of
    the rows.  Returns ``(thresholds, q)``.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [N>0, K], got {tuple(scores.shape)}")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
    s = scores.double()

    def cut(q: float) -> tuple[torch.Tensor, float]:
        t = torch.quantile(s, 1.0 - q, dim=0, interpolation="higher")
        return t, float((s > t).any(1).double().mean())

    lo, hi = 0.0, target_frr
    t_hi, frr_hi = cut(hi)
    if frr_hi <= target_frr:
        return t_hi.float(), hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if cut(mid)[1] <= target_frr:
            lo = mid
        else:
            hi = mid
    return cut(lo)[0].float(), lo

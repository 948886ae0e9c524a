"""Thresholds from clean scores, shared by the layers that OR several scores (ContraNet, MagNet)."""

from __future__ import annotations

import torch


def or_calibrate(scores: torch.Tensor, target_frr: float, iterations: int = 40,
                 rejected: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Thresholds ``[K]`` for an OR of ``K`` scores ``[N, K]`` with combined clean rejection ``≤ target_frr``.

    Every score is cut at its ``1 − q`` quantile (``'higher'``, so ``P(s > t) ≤ q``), with the
    largest ``q ∈ [0, target_frr]`` (bisection) whose OR still rejects ``≤ target_frr`` of
    the rows.  ``rejected [N]`` (bool): rows an earlier layer already rejects — they count as
    rejected whatever the scores say, so the thresholds fill what is left of the budget (none,
    ``q = 0`` and thresholds above every score, when those rows alone exceed it).
    Returns ``(thresholds, q)``.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [N>0, K], got {tuple(scores.shape)}")
    if not 0.0 <= target_frr < 1.0:
        raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
    s = scores.double()
    prior = torch.zeros(len(s), dtype=torch.bool) if rejected is None else rejected.bool().cpu()
    if prior.shape != (len(s),):
        raise ValueError(f"rejected must be [{len(s)}], got {tuple(prior.shape)}")
    if float(prior.double().mean()) >= target_frr:
        return s.amax(0).float(), 0.0

    def cut(q: float) -> tuple[torch.Tensor, float]:
        t = torch.quantile(s, 1.0 - q, dim=0, interpolation="higher")
        return t, float(((s > t).any(1) | prior).double().mean())

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

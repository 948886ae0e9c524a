"""Attacks at the literature's strength that torchattacks 3.5.1 does not provide as such.

* :class:`CarliniWagnerL2` — Carlini & Wagner's L2 attack (S&P 2017) *with* the binary search over
  the constant ``c`` and per-image bookkeeping: every image keeps the smallest-L2 AE that any
  search step found (``torchattacks.CW`` runs one fixed ``c`` and stops the whole batch early).
  Variables ``w`` with ``x_adv = (tanh(w) + 1) / 2`` (always in ``[0, 1]``); objective
  ``‖x_adv − x‖₂² + c · max(Z_y − max_{i≠y} Z_i, −κ)`` minimised with Adam for ``steps``
  iterations per search step.  ``c`` starts at ``initial_const``; after a step an image that found
  an AE halves its interval towards smaller ``c``, one that did not grows ``c`` tenfold until it
  has an upper bound, then bisects (Carlini's schedule).  An image is attacked successfully when
  ``max_{i≠y} Z_i − Z_y > κ`` (for ``κ = 0``: it is misclassified).  Images for which no step
  succeeds come back unchanged (their prediction tells).  Early abort per image (Carlini's rule,
  applied to each image instead of the whole batch): every ``steps // 10`` iterations an image whose
  objective fell by less than 0.01 % since the last check stops for the rest of that search step, and
  only the images still running go through the model (an active set; Adam's moments are kept per
  pixel, so a dropped image leaves the others' updates unchanged).
* :class:`Restarts` — any attack run ``restarts`` times (fresh random starts); each image keeps the
  first run's AE that fools the model (else the last run's).

Budgets and norms follow :mod:`mixdefense.attacks.registry`: pixel units of ``[0, 1]``, L2 over the
whole image.
"""

from __future__ import annotations

import torch
from torchattacks.attack import Attack

_UPPER_NONE = 1e10  # "no upper bound on c yet"


class CarliniWagnerL2(Attack):
    """C&W L2 with a binary search over ``c`` (see the module docstring).

    Args:
        search_steps: binary-search steps (≥ 1); ``search_steps × steps`` iterations per image in all.
        steps: Adam iterations per search step.
        initial_const: ``c`` of the first search step.
        kappa: confidence κ ≥ 0 (logit margin the AE must reach).
        lr: Adam learning rate on ``w`` (0.1: with ~1,000 iterations in all, Carlini's 0.01 cannot move
            pixels at 0 or 1, where ``tanh`` saturates — 60 % success on MNIST's LeNet instead of 100 %).
        abort_early: stop an image's search step once its objective stalls (see the module docstring);
            ``False`` runs every image for all ``steps`` iterations of every search step.
    """

    _ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults

    def __init__(self, model, search_steps: int = 9, steps: int = 120, initial_const: float = 0.1,
                 kappa: float = 0.0, lr: float = 0.1, abort_early: bool = True):
        super().__init__("CarliniWagnerL2", model)
        if search_steps < 1 or steps < 1:
            raise ValueError(f"search_steps and steps must be >= 1, got {search_steps}, {steps}")
        if kappa < 0 or initial_const <= 0 or lr <= 0:
            raise ValueError(f"need kappa >= 0, initial_const > 0, lr > 0; got {kappa}, {initial_const}, {lr}")
        self.search_steps, self.steps, self.initial_const = search_steps, steps, initial_const
        self.kappa, self.lr, self.abort_early = kappa, lr, abort_early
        self.supported_mode = ["default"]

    def _margin(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``max_{i≠y} Z_i − Z_y`` ``[B]`` (positive: misclassified)."""
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return other - true

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = images.clone().detach().to(self.device).float()
        y = labels.clone().detach().to(self.device)
        b = x.shape[0]
        best_adv, best_l2 = x.clone(), torch.full((b,), float("inf"), device=x.device)
        const = torch.full((b,), float(self.initial_const), device=x.device)
        lower, upper = torch.zeros(b, device=x.device), torch.full((b,), _UPPER_NONE, device=x.device)
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        b1, b2 = self._ADAM_BETAS
        check_every = max(1, self.steps // 10)
        for _ in range(self.search_steps):
            w = w0.clone()
            m1, m2 = torch.zeros_like(w), torch.zeros_like(w)  # Adam's moments, per pixel
            active = torch.arange(b, device=x.device)  # images still running in this search step
            previous = torch.full((b,), float("inf"), device=x.device)
            found = torch.zeros(b, dtype=torch.bool, device=x.device)
            for t in range(1, self.steps + 1):
                wa = w[active].requires_grad_(True)
                x_adv = (torch.tanh(wa) + 1) / 2
                l2sq = (x_adv - x[active]).flatten(1).pow(2).sum(1)
                margin = self._margin(self.get_logits(x_adv), y[active])
                loss = l2sq + const[active] * (self.kappa - margin).clamp_min(0)
                (grad,) = torch.autograd.grad(loss.sum(), wa)
                loss, margin, l2sq = loss.detach(), margin.detach(), l2sq.detach()
                with torch.no_grad():
                    m1[active] = b1 * m1[active] + (1 - b1) * grad
                    m2[active] = b2 * m2[active] + (1 - b2) * grad * grad
                    step = (m1[active] / (1 - b1 ** t)) / ((m2[active] / (1 - b2 ** t)).sqrt() + self._ADAM_EPS)
                    w[active] = wa.detach() - self.lr * step
                    # bookkeeping on the iterate the loss was computed at
                    ok = margin > self.kappa if self.kappa > 0 else margin > 0
                    l2 = l2sq.sqrt()
                    better = ok & (l2 < best_l2[active])
                    idx = active[better]
                    best_l2[idx] = l2[better]
                    best_adv[idx] = x_adv.detach()[better]
                    found[active[ok]] = True
                    if self.abort_early and t % check_every == 0:
                        stalled = loss > previous[active] * 0.9999
                        previous[active] = loss
                        active = active[~stalled]
                        if not len(active):
                            break
            with torch.no_grad():  # Carlini's schedule, per image
                upper = torch.where(found, torch.minimum(upper, const), upper)
                lower = torch.where(found, lower, torch.maximum(lower, const))
                bounded = upper < _UPPER_NONE / 10
                const = torch.where(bounded, (lower + upper) / 2, const * 10)
        return best_adv.detach()


class Restarts(Attack):
    """``attack`` run ``restarts`` times; each image keeps the first AE that fools the model."""

    def __init__(self, attack: Attack, restarts: int):
        super().__init__(f"Restarts({attack.attack})", attack.model)
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.inner, self.restarts = attack, restarts
        self.supported_mode = ["default"]

    def _fools(self, adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.get_logits(adv).argmax(1) != labels.to(adv.device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.inner(images, labels).detach()
        fooled = self._fools(out, labels)
        for _ in range(self.restarts - 1):
            if fooled.all():
                break
            todo = (~fooled).nonzero().squeeze(1)
            adv = self.inner(images[todo], labels[todo]).detach()
            out[todo] = adv
            fooled[todo] = self._fools(adv, labels[todo])
        return out

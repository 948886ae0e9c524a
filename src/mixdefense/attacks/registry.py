"""Attack registry over torchattacks, with budgets in [0, 1] pixel units.

Every attack takes images ``x [B, C, H, W]`` in ``[0, 1]``, integer labels ``y [B]`` and a
model that maps ``[0, 1]`` images to logits (normalisation inside the model), and returns
adversarial images in ``[0, 1]``.  Budgets: ``ε`` bounds ``‖x_adv − x‖∞`` (L∞ attacks) or
the L2 norm of the whole image's perturbation, ``‖x_adv − x‖₂`` over all C·H·W values (L2
attacks).  C&W and DeepFool have no budget: run them once and bin their AEs by the
measured norm (:func:`perturbation_norm`).

=================  =====  ============================================================
name               norm   attack (torchattacks 3.5.1)
=================  =====  ============================================================
``fgsm``           L∞     FGSM, one signed-gradient step of size ε
``fgm``            L2     one L2-normalised gradient step of length ε (PGDL2, 1 step)
``bim_linf``       L∞     BIM (Kurakin et al.): ``steps`` signed steps of ``2.5·ε/steps``
``bim_l2``         L2     BIM in L2: PGDL2 without random start, ``steps`` steps
``pgd_linf``       L∞     PGD (Madry et al.), random start, ``steps`` steps
``pgd_l2``         L2     PGDL2, random start
``cw``             L2     Carlini–Wagner L2 (no budget; binned by measured L2)
``deepfool``       L2     DeepFool, L2 steps (no budget; binned by measured norm)
``deepfool_linf``  L∞     DeepFool, L∞ steps (the ℓ1-dual linearisation; binned by L∞)
=================  =====  ============================================================

DeepFool is :class:`BatchedDeepFool`, a ``torchattacks.Attack`` that runs the whole batch at
once (``K`` backward passes per step for ``K`` classes).  Its L2 form takes exactly the steps of
``torchattacks.DeepFool`` (which loops over images one by one: minutes per batch on a CPU, and
hours for GTSRB's 43 classes); a test checks that both give the same AEs.

One-step attacks share work across a budget sweep: :func:`fgsm_sweep` and
:func:`fgm_sweep` compute the loss gradient at ``x`` once and scale it for every ε (the
sign of the gradient, and its L2 direction, do not depend on ε), which equals running
FGSM/FGM once per ε.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack: its norm, whether it takes a budget, and how to build it."""

    name: str
    norm: str  # "linf" or "l2"
    budgeted: bool
    build: Callable[..., torchattacks.Attack]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


def _fgsm(model, eps, **_):
    return torchattacks.FGSM(model, eps=eps)


def _fgm(model, eps, **_):
    return torchattacks.PGDL2(model, eps=eps, alpha=eps, steps=1, random_start=False)


def _bim_linf(model, eps, steps=10, **_):
    return torchattacks.BIM(model, eps=eps, alpha=2.5 * eps / steps, steps=steps)


def _bim_l2(model, eps, steps=10, **_):
    return torchattacks.PGDL2(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)


def _pgd_linf(model, eps, steps=10, alpha=None, random_start=True, **_):
    """PGD L∞; step ``alpha`` (default ``2.5·ε/steps``)."""
    return torchattacks.PGD(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps, random_start=random_start)


def _pgd_l2(model, eps, steps=10, alpha=None, random_start=True, **_):
    """PGD L2; step ``alpha`` (default ``2.5·ε/steps``)."""
    return torchattacks.PGDL2(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps, random_start=random_start)


def _cw(model, eps=None, c=1.0, kappa=0.0, steps=100, lr=0.01, **_):
    return torchattacks.CW(model, c=c, kappa=kappa, steps=steps, lr=lr)


class BatchedDeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016) on a whole batch at once.

    Per step, for every image not yet misclassified: linearise the classifier at the current
    point, take the closest wrong class ``l`` under the chosen norm, and step onto its
    linearised boundary, times ``1 + overshoot``, then clip to ``[0, 1]``:

    * ``norm="l2"``: ``δ = |f_l| · w_l / ‖w_l‖₂²`` (distance ``|f_k| / ‖w_k‖₂``), the update of
      ``torchattacks.DeepFool``;
    * ``norm="linf"``: ``δ = |f_l| · sign(w_l) / ‖w_l‖₁`` (distance ``|f_k| / ‖w_k‖₁``, the dual norm).

    ``f_k = logit_k − logit_y`` and ``w_k = ∇ₓ f_k``.  Images ``[B, C, H, W]`` in ``[0, 1]``.
    """

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, norm: str = "l2"):
        super().__init__("BatchedDeepFool", model)
        if norm not in ("l2", "linf"):
            raise ValueError(f"DeepFool norm must be 'l2' or 'linf', got {norm!r}")
        self.steps, self.overshoot, self.norm = steps, overshoot, norm
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        active = torch.ones(len(images), dtype=torch.bool, device=self.device)
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x = adv[idx].clone().requires_grad_(True)
            logits = self.get_logits(x)
            going = logits.argmax(1) == labels[idx]  # still correctly classified: keep stepping
            active[idx[~going]] = False
            if not going.any():
                break
            k = logits.shape[1]
            grads = torch.stack([torch.autograd.grad(logits[:, c].sum(), x, retain_graph=c < k - 1)[0] for c in range(k)], 1)
            adv[idx[going]] = self._step(x.detach()[going], logits.detach()[going], grads[going], labels[idx[going]])
        return adv.detach()

    def _step(self, x: torch.Tensor, logits: torch.Tensor, grads: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(y), device=y.device)
        f = logits - logits[rows, y][:, None]  # [b, K]
        w = grads - grads[rows, y][:, None]  # [b, K, C, H, W]
        dual = w.flatten(2).norm(p=2, dim=2) if self.norm == "l2" else w.flatten(2).abs().sum(2)
        dist = f.abs() / dual.clamp_min(1e-12)
        dist[rows, y] = float("inf")
        l = dist.argmin(1)  # noqa: E741  (the closest wrong class)
        f_l, w_l, n_l = f[rows, l].abs(), w[rows, l], dual[rows, l].clamp_min(1e-12)
        if self.norm == "l2":
            delta = (f_l / n_l**2).view(-1, 1, 1, 1) * w_l
        else:
            delta = (f_l / n_l).view(-1, 1, 1, 1) * w_l.sign()
        return (x + (1 + self.overshoot) * delta).clamp(0, 1)


def _deepfool(model, eps=None, steps=50, overshoot=0.02, **_):
    return BatchedDeepFool(model, steps=steps, overshoot=overshoot, norm="l2")


def _deepfool_linf(model, eps=None, steps=50, overshoot=0.02, **_):
    return BatchedDeepFool(model, steps=steps, overshoot=overshoot, norm="linf")


ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in (
        AttackSpec("fgsm", "linf", True, _fgsm, {}, "FGSM (Goodfellow et al.)"),
        AttackSpec("fgm", "l2", True, _fgm, {}, "FGM: one L2 gradient step"),
        AttackSpec("bim_linf", "linf", True, _bim_linf, {"steps": 10}, "BIM, L∞"),
        AttackSpec("bim_l2", "l2", True, _bim_l2, {"steps": 10}, "BIM, L2"),
        AttackSpec("pgd_linf", "linf", True, _pgd_linf, {"steps": 10}, "PGD, L∞, random start"),
        AttackSpec("pgd_l2", "l2", True, _pgd_l2, {"steps": 10}, "PGD, L2, random start"),
        AttackSpec("cw", "l2", False, _cw, {"c": 1.0, "kappa": 0.0, "steps": 100, "lr": 0.01}, "Carlini–Wagner L2"),
        AttackSpec("deepfool", "l2", False, _deepfool, {"steps": 50, "overshoot": 0.02}, "DeepFool, L2"),
        AttackSpec("deepfool_linf", "linf", False, _deepfool_linf, {"steps": 50, "overshoot": 0.02}, "DeepFool, L∞"),
    )
}


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; registered: {sorted(ATTACKS)}")
    return ATTACKS[name]


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image ``‖x_adv − x‖`` ``[B]``: L∞ (max abs) or L2 over all C·H·W values."""
    d = (x_adv - x).flatten(1)
    if norm == "linf":
        return d.abs().amax(1)
    if norm == "l2":
        return d.norm(dim=1)
    raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def fgsm_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]) -> list[torch.Tensor]:
    """FGSM at every ε of ``eps`` from one gradient: ``clip(x + ε·sign(∇ₓ loss), 0, 1)``."""
    g = _input_gradient(model, x, y).sign()
    return [(x + e * g).clamp(0, 1) for e in eps]


def fgm_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float]) -> list[torch.Tensor]:
    """FGM (L2) at every ε from one gradient: ``clip(x + ε·∇/‖∇‖₂, 0, 1)`` per image."""
    g = _input_gradient(model, x, y)
    unit = g / (g.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
    return [(x + e * unit).clamp(0, 1) for e in eps]


SWEEPS = {"fgsm": fgsm_sweep, "fgm": fgm_sweep}


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None = None, **kwargs) -> torch.Tensor:
    """Adversarial images for ``(x, y)`` with the registered attack ``name`` at budget ``eps``."""
    spec = get_attack(name)
    if spec.budgeted and (eps is None or eps <= 0):
        raise ValueError(f"attack {name!r} needs a budget eps > 0, got {eps}")
    was_training = model.training
    model.eval()
    try:
        attack = spec.build(model, eps, **{**spec.defaults, **kwargs})
        return attack(x, y).detach()
    finally:
        model.train(was_training)


def run_sweep(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], **kwargs) -> list[torch.Tensor]:
    """The attack at every budget of ``eps``; one-step attacks share one gradient (see module doc)."""
    if name in SWEEPS and not kwargs:
        was_training = model.training
        model.eval()
        try:
            return SWEEPS[name](model, x, y, eps)
        finally:
            model.train(was_training)
    return [run_attack(name, model, x, y, e, **kwargs) for e in eps]

"""Attack registry over torchattacks, with budgets in [0, 1] pixel units.

Every attack takes images ``x [B, C, H, W]`` in ``[0, 1]``, integer labels ``y [B]`` and a
model that maps ``[0, 1]`` images to logits (normalisation inside the model), and returns
adversarial images in ``[0, 1]``.  Budgets: ``ε`` bounds ``‖x_adv − x‖∞`` (L∞ attacks) or
the L2 norm of the whole image's perturbation, ``‖x_adv − x‖₂`` over all C·H·W values (L2
attacks).  C&W and DeepFool have no budget: run them once and bin their AEs by the
measured norm (:func:`perturbation_norm`).

====================  =====  ============================================================
name                  norm   attack (torchattacks 3.5.1 unless said)
====================  =====  ============================================================
``fgsm``              L∞     FGSM, one signed-gradient step of size ε
``fgm``               L2     one L2-normalised gradient step of length ε (PGDL2, 1 step)
``bim_linf``          L∞     BIM (Kurakin et al.): 50 signed steps of ``2.5·ε/steps``
``bim_l2``            L2     BIM in L2: PGDL2 without random start, 50 steps
``pgd_linf``          L∞     PGD (Madry et al.), random start, 50 steps; ``restarts`` (first AE that fools kept)
``pgd_l2``            L2     PGDL2, random start, 50 steps; ``restarts``
``pgd_linf_tied``     L∞     PGD with a channel-tied δ (one value per pixel, broadcast over C; gradient summed
                             over C), 50 steps, random start; ``restarts``.  Targets SAEC's blind spot: its
                             saturation map subtracts the channel mean (:class:`~.subspace.ChannelTiedPGD`)
``pgd_l2_tied``       L2     the same in L2 (budget on the broadcast δ: √C·‖p‖₂ ≤ ε)
``pgd_linf_lowfreq``  L∞     PGD on a (H/k)×(W/k) grid upsampled bilinearly (``factor`` k = 4), 50 steps,
                             random start; ``restarts``: smooth δ that a high-pass filter barely sees
                             (:class:`~.subspace.LowFrequencyPGD`)
``pgd_l2_lowfreq``    L2     the same in L2
``apgd_ce``           L∞     APGD with cross-entropy (Croce & Hein; AutoAttack's first component), 100 steps
``apgd_dlr``          L∞     APGD with the DLR loss (AutoAttack), 100 steps
``cw``                L2     Carlini–Wagner L2 with a binary search over c: 9 × 120 iterations
                             (:class:`~mixdefense.attacks.minimum_norm.CarliniWagnerL2`; no budget)
``cw_hc``             L2     the same at confidence κ = 10 (high-confidence AEs)
``deepfool``          L2     DeepFool, L2 steps, 100 steps, overshoot 0.02 (no budget)
``deepfool_linf``     L∞     DeepFool, L∞ steps (the ℓ1-dual linearisation), 100 steps
====================  =====  ============================================================

The four structured PGDs (:mod:`mixdefense.attacks.subspace`) bound the *full-resolution* δ
like every other attack (L∞, or L2 over all C·H·W values) and clip the image to ``[0, 1]``; for
one-channel images the tied ones are ``pgd_linf`` / ``pgd_l2`` (the same AEs up to float rounding).

DeepFool is :class:`BatchedDeepFool`, a ``torchattacks.Attack`` that runs the whole batch at
once (``K`` backward passes per step for ``K`` classes; ``torchattacks.DeepFool`` loops over images
one by one: minutes per batch on a CPU, hours for GTSRB's 43 classes) and accumulates its steps
before clipping, as the paper and Foolbox do.

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

from mixdefense.attacks.minimum_norm import CarliniWagnerL2, Restarts
from mixdefense.attacks.subspace import ChannelTiedPGD, LowFrequencyPGD


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


def _bim_linf(model, eps, steps=50, **_):
    return torchattacks.BIM(model, eps=eps, alpha=2.5 * eps / steps, steps=steps)


def _bim_l2(model, eps, steps=50, **_):
    return torchattacks.PGDL2(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)


def _restarted(attack: Attack, restarts: int) -> Attack:
    return attack if restarts == 1 else Restarts(attack, restarts)


def _pgd_linf(model, eps, steps=50, alpha=None, random_start=True, restarts=1, **_):
    """PGD L∞; step ``alpha`` (default ``2.5·ε/steps``); ``restarts`` random starts, the first AE that fools kept."""
    return _restarted(torchattacks.PGD(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps,
                                       random_start=random_start), restarts)


def _pgd_l2(model, eps, steps=50, alpha=None, random_start=True, restarts=1, **_):
    """PGD L2; step ``alpha`` (default ``2.5·ε/steps``); ``restarts`` as for L∞."""
    return _restarted(torchattacks.PGDL2(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps,
                                         random_start=random_start), restarts)


def _pgd_tied(norm: str):
    def build(model, eps, steps=50, alpha=None, random_start=True, restarts=1, **_):
        """Channel-tied PGD (:class:`ChannelTiedPGD`); step ``alpha`` (default ``2.5·ε/steps``); ``restarts``."""
        return _restarted(ChannelTiedPGD(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps,
                                         random_start=random_start, norm=norm), restarts)
    return build


def _pgd_lowfreq(norm: str):
    def build(model, eps, steps=50, alpha=None, random_start=True, restarts=1, factor=4, **_):
        """Low-frequency PGD (:class:`LowFrequencyPGD`, grid ``factor`` times coarser); as :func:`_pgd_tied`."""
        return _restarted(LowFrequencyPGD(model, eps=eps, alpha=alpha or 2.5 * eps / steps, steps=steps,
                                          random_start=random_start, norm=norm, factor=factor), restarts)
    return build


def _apgd(loss: str):
    def build(model, eps, steps=100, restarts=1, **_):
        return torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, n_restarts=restarts, loss=loss, seed=0)
    return build


def _cw(model, eps=None, search_steps=9, steps=120, initial_const=0.1, kappa=0.0, lr=0.1, abort_early=True, **_):
    return CarliniWagnerL2(model, search_steps=search_steps, steps=steps, initial_const=initial_const, kappa=kappa, lr=lr,
                           abort_early=abort_early)


class BatchedDeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al., CVPR 2016) on a whole batch at once.

    Per step, for every image not yet misclassified: linearise the classifier at the current
    point, take the closest wrong class ``l`` under the chosen norm and the step ``δ`` onto its
    linearised boundary; the steps add up to ``r`` and the iterate is ``clip(x + (1 + overshoot)·r, 0, 1)``
    (the paper's accumulated perturbation, as Foolbox does: clipping the iterate itself after
    every step, as ``torchattacks.DeepFool`` does, stalls on saturated pixels — on MNIST 38 % of the
    images then end without an AE):

    * ``norm="l2"``: ``δ = (d_l + 10⁻⁴) · w_l / ‖w_l‖₂`` with distance ``d_k = |f_k| / ‖w_k‖₂``;
    * ``norm="linf"``: ``δ = (d_l + 10⁻⁴) · sign(w_l)`` with ``d_k = |f_k| / ‖w_k‖₁`` (the dual norm).

    The ``10⁻⁴`` is the original implementation's (and Foolbox's) push across the boundary.

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
        adv, total = images.clone(), torch.zeros_like(images)
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
            step_idx = idx[going]
            total[step_idx] += self._step(logits.detach()[going], grads[going], labels[step_idx])
            adv[step_idx] = (images[step_idx] + (1 + self.overshoot) * total[step_idx]).clamp(0, 1)
        return adv.detach()

    def _step(self, logits: torch.Tensor, grads: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The step ``δ [b, C, H, W]`` onto the closest linearised boundary (no overshoot, no clipping)."""
        rows = torch.arange(len(y), device=y.device)
        f = logits - logits[rows, y][:, None]  # [b, K]
        w = grads - grads[rows, y][:, None]  # [b, K, C, H, W]
        dual = w.flatten(2).norm(p=2, dim=2) if self.norm == "l2" else w.flatten(2).abs().sum(2)
        dist = f.abs() / dual.clamp_min(1e-12)
        dist[rows, y] = float("inf")
        l = dist.argmin(1)  # noqa: E741  (the closest wrong class)
        w_l, step = w[rows, l], dist[rows, l] + 1e-4  # + 1e-4: the original code's push across the boundary
        if self.norm == "l2":
            return (step / dual[rows, l].clamp_min(1e-12)).view(-1, 1, 1, 1) * w_l
        return step.view(-1, 1, 1, 1) * w_l.sign()


def _deepfool(model, eps=None, steps=100, overshoot=0.02, **_):
    return BatchedDeepFool(model, steps=steps, overshoot=overshoot, norm="l2")


def _deepfool_linf(model, eps=None, steps=100, overshoot=0.02, **_):
    return BatchedDeepFool(model, steps=steps, overshoot=overshoot, norm="linf")


ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in (
        AttackSpec("fgsm", "linf", True, _fgsm, {}, "FGSM (Goodfellow et al.)"),
        AttackSpec("fgm", "l2", True, _fgm, {}, "FGM: one L2 gradient step"),
        AttackSpec("bim_linf", "linf", True, _bim_linf, {"steps": 50}, "BIM, L∞"),
        AttackSpec("bim_l2", "l2", True, _bim_l2, {"steps": 50}, "BIM, L2"),
        AttackSpec("pgd_linf", "linf", True, _pgd_linf, {"steps": 50, "restarts": 1}, "PGD, L∞, random start"),
        AttackSpec("pgd_l2", "l2", True, _pgd_l2, {"steps": 50, "restarts": 1}, "PGD, L2, random start"),
        AttackSpec("pgd_linf_tied", "linf", True, _pgd_tied("linf"), {"steps": 50, "restarts": 1},
                   "PGD, L∞, channel-tied δ (SAEC's channel-mean blind spot)"),
        AttackSpec("pgd_l2_tied", "l2", True, _pgd_tied("l2"), {"steps": 50, "restarts": 1},
                   "PGD, L2, channel-tied δ (SAEC's channel-mean blind spot)"),
        AttackSpec("pgd_linf_lowfreq", "linf", True, _pgd_lowfreq("linf"), {"steps": 50, "restarts": 1, "factor": 4},
                   "PGD, L∞, bilinearly upsampled δ from a 4× coarser grid"),
        AttackSpec("pgd_l2_lowfreq", "l2", True, _pgd_lowfreq("l2"), {"steps": 50, "restarts": 1, "factor": 4},
                   "PGD, L2, bilinearly upsampled δ from a 4× coarser grid"),
        AttackSpec("apgd_ce", "linf", True, _apgd("ce"), {"steps": 100, "restarts": 1}, "APGD-CE, L∞ (AutoAttack)"),
        AttackSpec("apgd_dlr", "linf", True, _apgd("dlr"), {"steps": 100, "restarts": 1}, "APGD-DLR, L∞ (AutoAttack)"),
        AttackSpec("cw", "l2", False, _cw, {"search_steps": 9, "steps": 120, "initial_const": 0.1, "kappa": 0.0, "lr": 0.1},
                   "Carlini–Wagner L2, binary search over c"),
        AttackSpec("cw_hc", "l2", False, _cw, {"search_steps": 9, "steps": 120, "initial_const": 0.1, "kappa": 10.0,
                                               "lr": 0.1}, "Carlini–Wagner L2, high confidence (κ = 10)"),
        AttackSpec("deepfool", "l2", False, _deepfool, {"steps": 100, "overshoot": 0.02}, "DeepFool, L2"),
        AttackSpec("deepfool_linf", "linf", False, _deepfool_linf, {"steps": 100, "overshoot": 0.02}, "DeepFool, L∞"),
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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands the gradient on in the default (NCHW) memory format."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class ChannelsLast(nn.Module):
    """``model`` run in channels-last memory format (faster convolutions on a CPU), for attacks.

    The weights are converted once (in place: the values are unchanged) and every input on the
    fly; the gradient with respect to the input comes back in the default NCHW format, which the
    attacks' ``.view`` calls need.  Logits as ``model``'s, up to float rounding.  ``[B, C, H, W]``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_ContiguousGrad.apply(x).contiguous(memory_format=torch.channels_last))


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

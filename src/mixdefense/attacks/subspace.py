"""PGD restricted to a linear subspace of perturbations: channel-tied and low-frequency.

Both attacks optimise a parameter ``p`` that a fixed linear map ``U`` lifts to the image's
perturbation ``δ = U(p) [B, C, H, W]``; the adversarial image is ``clip(x + U(p), 0, 1)``.
Budgets follow :mod:`mixdefense.attacks.registry`: ``‖δ‖∞ ≤ ε`` (``norm="linf"``) or the L2
norm of the *whole image's* perturbation, over all ``C·H·W`` values (``norm="l2"``), in ``[0, 1]``
pixel units; the constraint is always on the full-resolution ``δ = U(p)``, never on ``p``.

Each step takes the loss gradient ``g`` at the current (clipped) adversarial image, pulls it back
to the parameter, ``g_p = Uᵀ g`` (for the channel-tied map: the gradient summed over channels), and
moves ``p`` by ``α·sign(g_p)`` (L∞) or by ``α·g_p / ‖U g_p‖₂`` (L2: a step of length ``α`` in the
image), then projects ``p`` back on the budget.  Random start, ``steps`` steps, no early stop, the
last iterate returned — as ``torchattacks.PGD`` / ``PGDL2``.

* :class:`ChannelTiedPGD` — ``p [B, 1, H, W]`` broadcast over the ``C`` channels: the same
  perturbation in R, G and B.  SAEC's pseudo-saturation map (eq. 1) subtracts each pixel's mean
  over the channels, ``x_c − x_mean``, so a channel-tied ``δ`` cancels there exactly: SAEC sees the
  clean image (issue 25: an oblivious channel-summed PGD fooled the whole CIFAR-10 pipeline).
* :class:`LowFrequencyPGD` — ``p [B, C, ⌈H/k⌉, ⌈W/k⌉]`` upsampled bilinearly to ``H × W``: a smooth
  (continuous, piecewise-linear) perturbation, which a high-pass filter such as SAEC's kernel
  barely sees.

Both are ``torchattacks.attack.Attack`` subclasses (batched; ``default`` and ``targeted`` modes),
deterministic given ``torch.manual_seed`` (the random start is the only randomness).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchattacks.attack import Attack

NORMS = ("linf", "l2")


class SubspacePGD(Attack):
    """PGD over ``p`` with ``δ = U(p)`` (see the module docstring); subclasses define ``U``.

    Subclasses implement :meth:`param_shape` and :meth:`lift`, and may override :meth:`pullback`
    (default: the adjoint ``Uᵀ`` by autograd) and :meth:`bounds` (a per-entry box on ``p`` that keeps
    it where moving it still changes the clipped image; default: none).

    Args:
        model: maps ``[0, 1]`` images to logits.
        eps: budget ``ε > 0`` on the full-resolution ``δ`` (L∞, or L2 over all ``C·H·W`` values).
        alpha: step size ``α > 0`` in the same units (L2: the step's length in the image).
        steps: number of steps (≥ 1).
        random_start: start at a random ``p`` inside the budget (L∞: uniform in ``[−ε, ε]`` per entry
            of ``p``; L2: a Gaussian direction scaled to a radius uniform in ``[0, ε]``, as ``PGDL2``),
            else at ``p = 0``.
        norm: ``"linf"`` or ``"l2"``.
    """

    def __init__(self, name: str, model, eps: float, alpha: float, steps: int = 50, random_start: bool = True,
                 norm: str = "linf"):
        super().__init__(name, model)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.eps, self.alpha, self.steps = float(eps), float(alpha), steps
        self.random_start, self.norm = bool(random_start), norm
        self.supported_mode = ["default", "targeted"]

    # --- the subspace -------------------------------------------------------------------------
    def param_shape(self, images: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def lift(self, p: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``U(p)``: the image-space perturbation ``[B, C, H, W]``."""
        raise NotImplementedError

    def pullback(self, g: torch.Tensor, p: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``Uᵀ g``: an image-space gradient as a gradient on ``p`` (the vector–Jacobian product of :meth:`lift`)."""
        with torch.enable_grad():
            q = p.detach().requires_grad_(True)
            (gp,) = torch.autograd.grad(self.lift(q, images), q, grad_outputs=g)
        return gp

    def bounds(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    # --- PGD ----------------------------------------------------------------------------------
    def _image_norm(self, p: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``‖U(p)‖₂`` per image, over all ``C·H·W`` values, shaped ``[B, 1, …, 1]`` like ``p``."""
        n = self.lift(p, images).flatten(1).norm(dim=1)
        return n.view(-1, *([1] * (p.dim() - 1)))

    def project(self, p: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """``p`` back on the budget of ``U(p)``, then inside :meth:`bounds`.

        L∞: ``clamp(p, −ε, ε)``, which bounds ``‖U(p)‖∞`` by ``ε`` for every ``U`` whose output entries
        are convex combinations of entries of ``p`` (both subclasses).  L2: ``p·min(1, ε/‖U(p)‖₂)``, the
        exact Euclidean projection of ``U(p)`` on the ε ball (radial; it stays in the subspace).
        The box of :meth:`bounds` contains 0 and only shrinks entries, so the budget still holds.
        """
        if self.norm == "linf":
            p = p.clamp(-self.eps, self.eps)
        else:
            p = p * torch.clamp(self.eps / self._image_norm(p, images), max=1.0)
        box = self.bounds(images)
        if box is not None:
            p = torch.maximum(torch.minimum(p, box[1]), box[0])
        return p

    def _random_start(self, images: torch.Tensor) -> torch.Tensor:
        shape = self.param_shape(images)
        if self.norm == "linf":
            return torch.empty(shape, device=images.device, dtype=images.dtype).uniform_(-self.eps, self.eps)
        p = torch.empty(shape, device=images.device, dtype=images.dtype).normal_()
        n = self._image_norm(p, images)
        r = torch.zeros_like(n).uniform_(0, 1)
        return p * (r / n * self.eps)

    def _check(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"{self.attack} needs images [B, C, H, W], got shape {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{self.attack} needs labels [B] for {images.shape[0]} images, got shape {tuple(labels.shape)}")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check(images, labels)
        x = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        if self.targeted:
            y = self.get_target_label(x, y)
        sign = -1.0 if self.targeted else 1.0
        p = self._random_start(x) if self.random_start else torch.zeros(self.param_shape(x), device=x.device, dtype=x.dtype)
        p = self.project(p, x)
        for _ in range(self.steps):
            adv = (x + self.lift(p, x)).clamp(0, 1).requires_grad_(True)
            cost = sign * F.cross_entropy(self.get_logits(adv), y)
            (g,) = torch.autograd.grad(cost, adv)
            gp = self.pullback(g, p, x)
            if self.norm == "linf":
                p = p + self.alpha * gp.sign()
            else:
                p = p + self.alpha * gp / (self._image_norm(gp, x) + 1e-10)
            p = self.project(p.detach(), x)
        return (x + self.lift(p, x)).clamp(0, 1).detach()


class ChannelTiedPGD(SubspacePGD):
    """PGD whose perturbation is the same in every channel: ``δ = p`` broadcast over C, ``p [B, 1, H, W]``.

    The step uses the gradient summed over the channels (``Uᵀ g``); the budget is on the broadcast
    ``δ``: ``‖p‖∞ ≤ ε`` for L∞ and ``√C·‖p‖₂ ≤ ε`` for L2 (the whole image's norm).  After the budget,
    ``p`` is kept in ``[−max_c x_c, 1 − min_c x_c]`` per pixel — the range in which moving it still
    changes some channel of the clipped image (for ``C = 1`` this makes the attack
    ``torchattacks.PGD`` / ``PGDL2``, random start included, up to float rounding; tested).

    Clipping breaks exact tying: where ``x_c + p`` leaves ``[0, 1]`` for some but not all channels
    (a pixel with a saturated channel), the realised ``x_adv − x`` differs between channels there.
    Measured with ``pgd_linf_tied`` (50 steps, seed 0) on the first 200 correctly classified CIFAR-10
    test images and the shipped classifier: 1.5 % of the pixels (in 63 % of the images) at ε = 8/255,
    2.4 % (in 79 % of the images) at 16/255.  SAEC sees only those pixels' residue: the shipped bundle's
    SAEC rejected 0 % of these AEs at 8/255 and 0.5 % at 16/255 (plain ``pgd_linf``: 99.5 % and 100 %).
    """

    def __init__(self, model, eps: float, alpha: float, steps: int = 50, random_start: bool = True, norm: str = "linf"):
        super().__init__("ChannelTiedPGD", model, eps, alpha, steps, random_start, norm)

    def param_shape(self, images):
        b, _, h, w = images.shape
        return (b, 1, h, w)

    def lift(self, p, images):
        return p.expand(-1, images.shape[1], -1, -1)

    def pullback(self, g, p, images):
        return g.sum(1, keepdim=True)

    def bounds(self, images):
        return -images.amax(1, keepdim=True), 1 - images.amin(1, keepdim=True)


class LowFrequencyPGD(SubspacePGD):
    """PGD on a coarse grid upsampled bilinearly: ``δ = upsample(p)``, ``p [B, C, ⌈H/k⌉, ⌈W/k⌉]``.

    Why bilinear upsampling rather than a DCT low band: every entry of a bilinear upsample
    (``align_corners=False``, borders clamped) is a convex combination of grid values, so clamping ``p``
    to ``[−ε, ε]`` keeps the *full-resolution* ``‖δ‖∞ ≤ ε`` exactly and the L∞ step stays a sign step;
    the L2 ball is projected exactly by radial scaling.  In a DCT band the L∞ ball has no such
    projection (the cube intersected with the band): clipping the full-resolution ``δ`` to ``[−ε, ε]``,
    as Sharma et al. (2019) do, leaves the band.  The price: ``δ`` is piecewise linear, not strictly
    band-limited — for ``k = 4`` on 32 × 32 images ~94 % of its energy lies in the DCT band below
    ``H/k × W/k`` and > 99.5 % below ``2H/k × 2W/k`` (random grids, and the AEs of 20 CIFAR-10 test images at
    8/255, clipping included; plain PGD's δ: 6 % and 25 %; tested on 16 × 16 images).  The reachable set
    ``{upsample(p): ‖p‖∞ ≤ ε}`` is slightly smaller than the band's whole ε cube (interior grid values
    are never reproduced exactly, so a grid value could exceed ε without any pixel doing so).

    ``factor = k ≥ 1`` (``k = 1``: plain PGD on every pixel, without :class:`ChannelTiedPGD`'s box).
    Clipping the image to ``[0, 1]`` can add high-frequency content at saturated pixels.
    """

    def __init__(self, model, eps: float, alpha: float, steps: int = 50, random_start: bool = True,
                 norm: str = "linf", factor: int = 4):
        super().__init__("LowFrequencyPGD", model, eps, alpha, steps, random_start, norm)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
        self.factor = factor

    def param_shape(self, images):
        b, c, h, w = images.shape
        if self.factor > min(h, w):
            raise ValueError(f"factor {self.factor} is larger than the image ({h} × {w})")
        return (b, c, math.ceil(h / self.factor), math.ceil(w / self.factor))

    def lift(self, p, images):
        size = images.shape[-2:]
        if p.shape[-2:] == size:
            return p
        return F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)

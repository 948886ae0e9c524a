"""Adaptive (defense-aware) attacks on MixDefense: paper §6 and a full white-box attack.

The paper argues that MixDefense resists adaptive attacks because the classifier's label
reaches ContraNet only through an ``argmax``.  An attacker who *picks* the target label
``t`` in advance needs no gradient through that ``argmax``: with ``t`` fixed, every part
of the pipeline is a function of ``x`` alone, and all of them can be optimised together.
This module implements that attack and the paper's own case studies.

Conventions (everywhere in this module):

* images ``x [B, C, H, W]`` float in ``[0, 1]`` at the classifier's size; targets ``t [B]``
  int64; budgets ``ε`` in ``[0, 1]`` pixel units: ``‖x_adv − x‖∞ ≤ ε`` (``norm="linf"``) or
  the L2 norm of the *whole* image's perturbation (all ``C·H·W`` values, ``norm="l2"``);
  every AE is also clipped to ``[0, 1]``.  Step sizes ``α`` use the same units.
* a *margin* is a layer's ``score / threshold`` oriented so that ``> 1`` means "rejected"
  (what :meth:`mixdefense.pipeline.MixDefense.layer_table` uses); the attack works with
  ``log margin`` (``> 0`` rejected).

Parts:

* :class:`SoftSAEC` — a differentiable surrogate of :class:`~mixdefense.layers.saec.SAEC`: the same
  pseudo-saturation map and high-pass kernel, then a *soft* histogram whose bin edges are
  sigmoids of width ``τ`` (a fraction of the bin width) instead of hard steps; as ``τ → 0``
  it is the real histogram.  ``NL`` = variance of the bin fractions, margin
  ``threshold / NL`` exactly like the real layer (BPDA in the sense of Athalye et al.:
  a smooth stand-in for a non-differentiable part).
* :class:`PipelineObjective` — the attacker's view of a :class:`~mixdefense.pipeline.MixDefense`
  under a fixed target ``t``: per-image differentiable terms (cross-entropy toward ``t``,
  each layer's log margin, SAEC through the surrogate) and the *exact* verdict (real
  layers) used to decide success.
* :func:`adaptive_pgd` — targeted PGD (L∞ or L2) on
  ``CE(f(x), t) + λ·Σ_post relu(log m_j + κ) + μ·Σ_pre relu(log m̃_j + κ)``;
  with ``λ = μ = 0`` and ``select="last"`` it is plain targeted PGD (as torchattacks' ``PGD``
  in targeted mode; tested).  No EOT is needed: ContraNet's reconstructor encodes with the
  encoder *mean* μ(x) at inference (:class:`~mixdefense.nets.cgan.Reconstructor`), so its
  score is a deterministic, differentiable function of ``x``.
  ``targeted=False`` attacks the true label instead (see :class:`PipelineObjective`), and
  ``subspace=`` keeps the perturbation in a :class:`~mixdefense.attacks.subspace.SubspacePGD`'s
  subspace (channel-tied, low-frequency; :func:`make_subspace`).
* :func:`orthogonal_pgd` — Orthogonal / Selective PGD (Bryniarski et al., ICLR 2022).
* :func:`with_restarts` — reruns an attack from random starts on the images it has not broken yet.
* :func:`support_mask` — restrict a perturbation to the image content and a rim (on MNIST
  the surrogate's gradient cannot keep the flat background flat — see :class:`SoftSAEC` —
  but an attacker who never touches it leaves SAEC's histogram peak intact).
* :func:`fgsm_on_cgan_input` and :func:`attack_latent` — the paper's §6 case studies
  (Figures 12 and 13; :func:`mixdefense.evaluation.plots.case_study_grid` draws them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure as ssim
from tqdm.auto import tqdm

from mixdefense.layers.saec import SAEC, high_pass

NORMS = ("linf", "l2")
SELECT = ("last", "pipeline")
_TINY = 1e-30  # keeps (Σ|d|^p)^(1/p) differentiable where every channel agrees


# -- the SAEC surrogate ------------------------------------------------------------------
def soft_pseudo_saturation(x: torch.Tensor, p: float, gray_mode: str) -> torch.Tensor:
    """Differentiable eq. 1 ``[B, H, W]``, equal to :func:`mixdefense.layers.saec.pseudo_saturation` up to
    ``(_TINY)^(1/p)/s`` (≈ 3e-6 at ``p = 8``) where all channels of a pixel agree."""
    if x.shape[1] == 1:
        if gray_mode == "identity":
            return x[:, 0]
        local = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return (x - local).abs()[:, 0]
    scale = min(64.0, (1e30 / x.shape[1]) ** (1.0 / p))
    d = (x - x.mean(dim=1, keepdim=True)) * scale
    return (d.abs().pow(p).sum(dim=1) + _TINY).pow(1.0 / p) / scale


def soft_histogram(v: torch.Tensor, bins: int, lo: float, hi: float, temperature: float) -> torch.Tensor:
    """Differentiable per-row histogram of ``v [B, N]`` → bin *fractions* ``[B, bins]`` over ``[lo, hi]``.

    The hard rule (:func:`mixdefense.layers.saec.batched_histogram`) puts ``v`` in bin ``i`` when
    ``e_i ≤ v < e_{i+1}`` (``e_i = lo + i·w``).  Here bin ``i`` gets
    ``σ((v − e_i)/τ + s) − σ((v − e_{i+1})/τ + s)`` with ``τ = temperature·w`` and ``s = 3``:
    the shift sends a value lying exactly on an edge 95 % to the upper bin, as ``floor``
    does (MNIST's flat background gives residuals of exactly 0, an edge when ``bins`` is
    even).  Values outside ``[lo, hi]`` fall in no bin.  As ``temperature → 0`` this is the
    hard histogram (divided by ``N``).
    """
    width = (hi - lo) / bins
    edges = torch.linspace(lo, hi, bins + 1, device=v.device, dtype=v.dtype)
    above = torch.sigmoid((v[:, :, None] - edges) / (temperature * width) + SoftSAEC.SHIFT).mean(1)  # [B, bins+1]
    return above[:, :-1] - above[:, 1:]


class SoftSAEC(nn.Module):
    """A differentiable stand-in for a calibrated :class:`~mixdefense.layers.saec.SAEC` (same settings, same threshold).

    Same pseudo-saturation map (:func:`soft_pseudo_saturation`) and high-pass kernel, then
    :func:`soft_histogram` instead of the hard one; ``NL̃`` = variance of the soft bin
    fractions, margin ``threshold / NL̃`` as in :meth:`SAEC.margin`.

    Args:
        saec: the real layer (calibrated: its threshold is used for the margin).
        temperature: edge width as a fraction of the bin width.  ``0.05`` (default) tracks the
            real score closely (Spearman ≥ 0.99 on clean + noisy MNIST/GTSRB test images).

    A known limit, measured on MNIST: where the whole 5×5 window is flat, every residual
    sits at the same point, and the zero-sum kernel makes the first-order change of the
    (soft) histogram cancel — the surrogate's gradient there carries no "stay flat"
    signal, so sign-gradient attacks still spray the background.  An attacker then
    restricts the support instead (:func:`support_mask`).
    """

    SHIFT = 3.0  # in units of τ

    def __init__(self, saec: SAEC, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.saec, self.temperature = saec, float(temperature)

    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        """Soft bin fractions ``[B, L]`` of ``x [B, C, H, W]`` in [0, 1] (each row sums to ≤ 1)."""
        s = self.saec
        feat = high_pass(soft_pseudo_saturation(x, float(s.p), s.gray_mode), s.kernel).flatten(1)  # [B, N]
        r = float(s.value_range)
        return soft_histogram(feat, int(s.bins), -r, r, self.temperature)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Surrogate noise level ``NL̃ [B]`` (variance of the soft bin fractions; smaller = noisier)."""
        return self.histogram(x).var(dim=1, unbiased=False)

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """``threshold / NL̃ [B]``, comparable to :meth:`SAEC.margin` (``> 1``: would be rejected)."""
        if not self.saec.calibrated:
            raise RuntimeError("SoftSAEC needs a calibrated SAEC (its threshold defines the margin)")
        return self.saec.threshold / self.score(x).clamp_min(torch.finfo(torch.float32).tiny)


# -- budgets -----------------------------------------------------------------------------
def check_budget(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """``x_adv`` moved into the ε-ball around ``x`` and into ``[0, 1]`` (both ``[B, C, H, W]``).

    L∞: the difference is clipped per value (torchattacks' order of operations).  L2: the
    whole image's difference is rescaled to norm ``≤ ε``, then the image clipped to [0, 1]
    (clipping toward ``x ∈ [0, 1]`` only shrinks every coordinate of the difference, so the
    norm stays ``≤ ε``).
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    return (x + delta).clamp(0, 1)


def descent_step(x_adv: torch.Tensor, grad: torch.Tensor, norm: str, alpha: float) -> torch.Tensor:
    """One step *down* the gradient: ``x − α·sign(g)`` (L∞) or ``x − α·g/‖g‖₂`` (L2, per image)."""
    if norm == "linf":
        return x_adv - alpha * grad.sign()
    n = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return x_adv - alpha * grad / (n + 1e-12)


def support_mask(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """``[B, 1, H, W]`` float mask of the pixels within ``dilation`` px (Chebyshev) of a non-zero pixel of ``x``.

    An attacker's choice against SAEC on images with an exactly flat background (MNIST):
    residuals of the high-pass filter stay exactly 0 where the whole 5×5 window is
    background, so perturbing only the content and its rim leaves most of the histogram's
    peak intact.  ``dilation = 0`` keeps the non-zero pixels only.
    """
    if dilation < 0:
        raise ValueError(f"dilation must be >= 0, got {dilation}")
    content = (x.amax(dim=1, keepdim=True) > 0).float()
    if dilation == 0:
        return content
    return F.max_pool2d(content, 2 * dilation + 1, stride=1, padding=dilation)


def random_start(x: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ε-ball around ``x`` in [0, 1]: uniform per value (L∞), or a uniformly random
    direction with radius ``U(0, ε)`` (L2, torchattacks' PGDL2 start)."""
    if norm == "linf":
        noise = (2 * torch.rand(x.shape, generator=generator) - 1).to(x) * eps
    else:
        d = torch.randn(x.shape, generator=generator).to(x)
        r = torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x)
        noise = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12) * r * eps
    return (x + noise).clamp(0, 1)


# -- the attacker's view of the pipeline --------------------------------------------------
def untargeted_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y − max_{j≠y} z_j`` ``[B]`` (``labels`` = true labels ``y``): ``> 0`` while the classifier says ``y``.

    The untargeted attack *minimises* it, i.e. raises the best wrong logit's margin
    ``max_{j≠y} z_j − z_y`` (Carlini & Wagner's ``f_6`` without the target)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return own - others


def leading_wrong_label(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``argmax_{j≠y} z_j`` ``[B]``: the label the classifier gives once an untargeted attack succeeds."""
    return logits.detach().scatter(1, labels[:, None], float("-inf")).argmax(1)


@dataclass
class Verdict:
    """Exact outcome for each AE under its target (bool ``[B]`` each).

    ``hit``: the classifier says ``t`` (targeted) / anything but the true ``y`` (untargeted);
    ``accepted[name]``: that layer alone accepts it (a post layer judged under label ``t``, or
    untargeted under the classifier's label, which is the label it sees where ``hit``);
    ``fooled``: ``hit`` and every layer accepts (success against the whole MixDefense).
    """

    hit: torch.Tensor
    accepted: dict[str, torch.Tensor]

    @property
    def fooled(self) -> torch.Tensor:
        ok = self.hit.clone()
        for a in self.accepted.values():
            ok &= a
        return ok


class PipelineObjective:
    """Differentiable per-image terms of a :class:`~mixdefense.pipeline.MixDefense` under fixed targets.

    Pre-classifier layers must be :class:`SAEC` (replaced by :class:`SoftSAEC` for gradients);
    post-classifier layers need a differentiable ``margin(x, y)`` (ContraNet's is).
    ``differentiable=False`` builds no surrogate and accepts any pre layer: :meth:`verdict` still
    works (the gradient-free attacks of :mod:`mixdefense.attacks.gradient_free` use only it),
    :meth:`terms` then refuses pre layers.

    Two attacker goals (``targeted``, every method):

    * targeted (default): ``labels`` are targets ``t``; the classifier's term is ``CE(f(x), t)``,
      post layers are judged under ``t``; success = the classifier says ``t`` and every layer accepts.
    * untargeted: ``labels`` are the true ``y``; the classifier's term is the margin
      ``max(z_y − max_{j≠y} z_j, −confidence)`` (:func:`untargeted_margin`), post layers are judged
      under the leading wrong label ``argmax_{j≠y} z_j`` (:func:`leading_wrong_label`, the label the
      pipeline will see once the margin flips; no gradient through the ``argmax``); success = the
      classifier says anything but ``y`` and every layer accepts under that label.
    """

    def __init__(self, detector: nn.Module, temperature: float = 0.05, differentiable: bool = True):
        self.classifier = detector.classifier.eval()
        self.layers = list(detector.layers)
        self.surrogates: dict[str, nn.Module] = {}
        for layer in self.layers:
            if layer.kind == "pre" and differentiable:
                if not isinstance(layer, SAEC):
                    raise TypeError(f"no differentiable surrogate for pre-classifier layer {layer.name!r} ({type(layer).__name__})")
                self.surrogates[layer.name] = SoftSAEC(layer, temperature)
        for p in self.classifier.parameters():
            p.requires_grad_(False)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def kind(self, name: str) -> str:
        return next(layer.kind for layer in self.layers if layer.name == name)

    @staticmethod
    def judged_labels(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = True) -> torch.Tensor:
        """The label the post layers are judged under: the target, or the leading wrong label (untargeted)."""
        return labels if targeted else leading_wrong_label(logits, labels)

    @staticmethod
    def classifier_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool = True,
                        confidence: float = 0.0) -> torch.Tensor:
        """The classifier's term ``[B]`` (minimised): ``CE(f(x), t)``, or untargeted ``max(z_y − max_{j≠y} z_j, −confidence)``."""
        if targeted:
            return F.cross_entropy(logits, labels, reduction="none")
        return untargeted_margin(logits, labels).clamp_min(-confidence)

    def terms(self, x: torch.Tensor, t: torch.Tensor, layers: Sequence[str], targeted: bool = True,
              confidence: float = 0.0) -> dict[str, torch.Tensor]:
        """``{"logits": [B, K], "loss": [B], "judged": [B], <layer>: log margin [B] ...}`` for the named layers
        (differentiable); ``loss`` is :meth:`classifier_loss` (also under ``"ce"`` when targeted), post layers are
        judged under ``judged`` (:meth:`judged_labels`)."""
        logits = self.classifier(x)
        judged = self.judged_labels(logits, t, targeted)
        loss = self.classifier_loss(logits, t, targeted, confidence)
        out = {"logits": logits, "loss": loss, "judged": judged}
        if targeted:
            out["ce"] = loss
        for layer in self.layers:
            if layer.name not in layers:
                continue
            if layer.kind == "pre":
                if layer.name not in self.surrogates:
                    raise RuntimeError(f"no surrogate for pre layer {layer.name!r}: built with differentiable=False")
                m = self.surrogates[layer.name].margin(x)
            else:
                m = layer.margin(x, judged)
            out[layer.name] = m.clamp_min(1e-12).log()
        return out

    @torch.no_grad()
    def hits(self, x: torch.Tensor, labels: torch.Tensor, targeted: bool = True, batch_size: int = 250) -> torch.Tensor:
        """``[B]`` bool: the bare classifier is fooled (says ``t``; untargeted: anything but ``y``), in batches."""
        out = []
        for xb, lb in zip(x.split(batch_size), labels.split(batch_size)):
            pred = self.classifier(xb.detach()).argmax(1)
            out.append(pred == lb if targeted else pred != lb)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)

    @torch.no_grad()
    def verdict(self, x: torch.Tensor, t: torch.Tensor, logits: torch.Tensor | None = None,
                post_margins: dict[str, torch.Tensor] | None = None, only: torch.Tensor | None = None,
                targeted: bool = True) -> Verdict:
        """The exact :class:`Verdict` of ``x`` (real layers).  Already computed ``logits`` and post-layer
        log margins (``post_margins``) are reused; post layers run only where ``only`` (default: ``hit``
        and every pre layer accepts), the rest count as rejected — they cannot be successes anyway.
        ``targeted=False``: ``t`` are the true labels, post layers judge the classifier's own label."""
        x = x.detach()
        pred = (self.classifier(x) if logits is None else logits.detach()).argmax(1)
        hit = pred == t if targeted else pred != t
        t = t if targeted else pred
        accepted = {}
        for layer in self.layers:
            if layer.kind == "pre":
                accepted[layer.name] = layer.margin(x) <= 1
        pre_ok = hit.clone()
        for a in accepted.values():
            pre_ok &= a
        mask = pre_ok if only is None else only
        for layer in self.layers:
            if layer.kind != "post":
                continue
            if post_margins is not None and layer.name in post_margins:
                accepted[layer.name] = post_margins[layer.name].detach() <= 0
                continue
            ok = torch.zeros_like(hit)
            if mask.any():
                ok[mask] = layer.margin(x[mask], t[mask]) <= 1
            accepted[layer.name] = ok
        return Verdict(hit, accepted)

    @torch.no_grad()
    def full_verdict(self, x: torch.Tensor, t: torch.Tensor, batch_size: int = 250, targeted: bool = True) -> Verdict:
        """Every layer on every image (for reports), in batches."""
        parts = [self.verdict(xb, tb, only=torch.ones_like(tb, dtype=torch.bool), targeted=targeted)
                 for xb, tb in zip(x.split(batch_size), t.split(batch_size))]
        return Verdict(torch.cat([p.hit for p in parts]),
                       {n: torch.cat([p.accepted[n] for p in parts]) for n in self.names})


def hinge(log_margin: torch.Tensor, kappa: float) -> torch.Tensor:
    """``relu(log m + κ)``: positive while the layer rejects (or is within ``κ`` of rejecting), else 0."""
    return F.relu(log_margin + kappa)


# -- the full adaptive attack -------------------------------------------------------------
@dataclass
class AttackResult:
    """AEs ``x_adv [B, C, H, W]`` and, per image, the step at which the pipeline was first fooled
    (``-1``: never during the run; only tracked with ``select="pipeline"``)."""

    x_adv: torch.Tensor
    success_step: torch.Tensor
    info: dict = field(default_factory=dict)


def _weights(objective: PipelineObjective, lam: float, mu: float) -> dict[str, float]:
    return {n: (lam if objective.kind(n) == "post" else mu) for n in objective.names}


def adaptive_pgd(objective: PipelineObjective, x: torch.Tensor, t: torch.Tensor, *, norm: str = "linf",
                 eps: float, steps: int = 20, alpha: float | None = None, lam: float = 0.0, mu: float = 0.0,
                 kappa: float = 0.1, rand_init: bool = False, select: str = "last", mask: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 250, progress: bool = True,
                 targeted: bool = True, confidence: float = 0.0, subspace=None) -> AttackResult:
    """PGD on the whole pipeline: minimise ``L_f(x) + λ·Σ_post relu(log m + κ) + μ·Σ_pre relu(log m̃ + κ)``.

    ``L_f`` is :meth:`PipelineObjective.classifier_loss`: ``CE(f(x), t)`` (targeted, ``t`` the targets) or
    ``max(z_y − max_{j≠y} z_j, −confidence)`` (``targeted=False``, ``t`` the true labels; post layers
    judged under the leading wrong label).

    Args:
        x: clean images ``[B, C, H, W]`` in [0, 1]; ``t``: target labels ``[B]`` (untargeted: true labels).
        norm, eps: the budget (module docstring); ``alpha``: step size (default ``2.5·ε/steps``).
        lam: weight of the post-classifier layers' terms (ContraNet, judged under ``t``).
        mu: weight of the pre-classifier layers' terms (SAEC, through :class:`SoftSAEC`).
        kappa: hinge offset: a layer's term vanishes once its log margin is below ``−κ``.
        rand_init: start at a random point of the ball (:func:`random_start`, drawn from ``generator``;
            with ``subspace``, the subspace's own random start, seeded from ``generator``).
        select: ``"last"`` returns the last iterate (plain PGD); ``"pipeline"`` returns, per image,
            the first iterate the *real* pipeline accepts as ``t`` (and stops updating it), else
            the last one — the attacker knows the defense and can check.
        mask: optional ``[B, 1 or C, H, W]`` in {0, 1}: only these values are ever perturbed
            (e.g. :func:`support_mask`); the budget holds either way.
        targeted, confidence: the attacker's goal (:class:`PipelineObjective`).
        subspace: optional :class:`~mixdefense.attacks.subspace.SubspacePGD` (:func:`make_subspace`) with the
            same ``norm`` and ``eps``: the attack then optimises its parameter ``p`` and the AE is
            ``clip(x + U(p), 0, 1)``, with the subspace's own ``lift`` (``U``), ``pullback`` (``Uᵀ``) and
            ``project`` (the budget on the full-resolution ``U(p)``); the step is ``−α·sign(Uᵀg)`` (L∞) or
            ``−α·Uᵀg/‖U Uᵀg‖₂`` (L2), as in :class:`~mixdefense.attacks.subspace.SubspacePGD`.  Not with ``mask``.
    """
    check_budget(norm, eps)
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    if lam < 0 or mu < 0 or steps < 1 or confidence < 0:
        raise ValueError(f"need lam >= 0, mu >= 0, steps >= 1, confidence >= 0; got {lam}, {mu}, {steps}, {confidence}")
    if subspace is not None:
        if subspace.norm != norm or not math.isclose(subspace.eps, eps, rel_tol=1e-9, abs_tol=0.0):
            raise ValueError(f"subspace budget ({subspace.norm}, {subspace.eps}) differs from the attack's ({norm}, {eps})")
        if mask is not None:
            raise ValueError("a subspace attack takes no mask (the subspace defines where δ lives)")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    weights = _weights(objective, lam, mu)
    active_terms = [n for n, w in weights.items() if w > 0]
    out, succ = [], []
    masks = _mask_chunks(mask, x, batch_size)
    chunks = list(zip(x.split(batch_size), t.split(batch_size), masks))
    bar = tqdm(total=steps * len(chunks), desc=f"adaptive PGD ε={eps:.4g} λ={lam:g} μ={mu:g}", disable=not progress, leave=False)
    for xb, tb, mb in chunks:
        x0 = xb.detach()
        if subspace is None:
            xa = _start(x0, norm, eps, generator, mb) if rand_init else x0.clone()
        else:
            p = _subspace_start(subspace, x0, rand_init, generator)
            xa = (x0 + subspace.lift(p, x0)).clamp(0, 1).detach()
        step_of = torch.full((xb.shape[0],), -1, dtype=torch.long)
        done = 0
        for k in range(steps + (select == "pipeline")):
            idx = (step_of < 0).nonzero().squeeze(1) if select == "pipeline" else torch.arange(xb.shape[0])
            if idx.numel() == 0:
                break
            xi = xa[idx].detach().requires_grad_(True)
            terms = objective.terms(xi, tb[idx], active_terms, targeted=targeted, confidence=confidence)
            if select == "pipeline":
                posts = {n: terms[n] for n in active_terms if objective.kind(n) == "post"}
                fooled = objective.verdict(xi, tb[idx], logits=terms["logits"], post_margins=posts, targeted=targeted).fooled
                step_of[idx[fooled]] = k
                if k == steps:
                    break
                keep = ~fooled
                if not keep.any():
                    break
            else:
                keep = torch.ones(idx.numel(), dtype=torch.bool)
            loss = terms["loss"] + sum(weights[n] * hinge(terms[n], kappa) for n in active_terms)
            (grad,) = torch.autograd.grad(loss.sum(), xi)
            if subspace is None:
                if mb is not None:
                    grad = grad * mb[idx]
                new = project(descent_step(xi.detach(), grad, norm, alpha), x0[idx], norm, eps)
            else:
                p_new = _subspace_step(subspace, p[idx], grad, x0[idx], alpha)
                new = (x0[idx] + subspace.lift(p_new, x0[idx])).clamp(0, 1).detach()
                p[idx[keep]] = p_new[keep]
            xa[idx[keep]] = new[keep]
            bar.update(1)
            done += 1
        bar.update(steps - done)
        out.append(xa)
        succ.append(step_of)
    bar.close()
    info = {"norm": norm, "eps": eps, "steps": steps, "alpha": alpha, "lam": lam, "mu": mu, "kappa": kappa, "select": select,
            "targeted": targeted}
    if not targeted:
        info["confidence"] = confidence
    if subspace is not None:
        info["subspace"] = type(subspace).__name__
    return AttackResult(torch.cat(out), torch.cat(succ), info)


# -- subspaces and restarts ---------------------------------------------------------------
SUBSPACES = ("channel_tied", "lowfreq")


def make_subspace(kind: str, model: nn.Module, *, norm: str, eps: float, steps: int, alpha: float | None = None,
                  factor: int = 4):
    """The :mod:`mixdefense.attacks.subspace` attack whose ``lift`` / ``pullback`` / ``project`` define a subspace
    of perturbations for :func:`adaptive_pgd`'s ``subspace=``: ``"channel_tied"`` (:class:`ChannelTiedPGD`) or
    ``"lowfreq"`` (:class:`LowFrequencyPGD`, grid ``factor``).  Only its geometry is used here, never its
    ``forward``; ``model`` is what it would attack on its own."""
    from mixdefense.attacks.subspace import ChannelTiedPGD, LowFrequencyPGD

    alpha = 2.5 * eps / steps if alpha is None else alpha
    if kind == "channel_tied":
        return ChannelTiedPGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm)
    if kind == "lowfreq":
        return LowFrequencyPGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, factor=factor)
    raise ValueError(f"subspace must be one of {SUBSPACES}, got {kind!r}")


def _subspace_start(subspace, x0: torch.Tensor, rand_init: bool, generator: torch.Generator | None) -> torch.Tensor:
    """``p`` at ``0``, or the subspace's own random start (drawn under a seed taken from ``generator``), projected."""
    if not rand_init:
        return torch.zeros(subspace.param_shape(x0), dtype=x0.dtype, device=x0.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        p = subspace._random_start(x0)
    return subspace.project(p, x0)


def _subspace_step(subspace, p: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, alpha: float) -> torch.Tensor:
    """One descent step on ``p`` from the image gradient ``grad`` (pulled back by ``Uᵀ``), then the subspace's projection."""
    gp = subspace.pullback(grad, p, x0)
    if subspace.norm == "linf":
        p = p - alpha * gp.sign()
    else:
        p = p - alpha * gp / (subspace._image_norm(gp, x0) + 1e-10)
    return subspace.project(p.detach(), x0)


def with_restarts(attack: Callable[[torch.Tensor, bool], torch.Tensor], x: torch.Tensor, restarts: int,
                  success: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run an attack up to ``restarts`` times; per image keep a successful AE.

    ``attack(idx, random_start) -> x_adv [n, C, H, W]`` attacks the images ``x[idx]``; run 1 starts at
    ``x`` (``random_start=False``), every later run at a random point of the budget and only on the images
    no earlier run broke; ``success(x_adv, idx) -> [n] bool`` decides "broken".  An image once broken is
    never attacked again and keeps its first successful AE (a restart never un-breaks it); an image no run
    broke keeps run 1's AE.  Returns ``(x_adv [B, C, H, W], broken [B] bool)``.
    """
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x_adv = x.detach().clone()
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    for r in range(restarts):
        todo = (~broken).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        xa = attack(todo, r > 0).detach()
        ok = success(xa, todo).to(torch.bool).cpu()
        if r == 0:
            x_adv[todo] = xa
        else:
            x_adv[todo[ok]] = xa[ok]
        broken[todo[ok]] = True
    return x_adv, broken


def _mask_chunks(mask: torch.Tensor | None, x: torch.Tensor, batch_size: int) -> list:
    if mask is None:
        return [None] * len(x.split(batch_size))
    if mask.dim() != 4 or mask.shape[0] != x.shape[0] or mask.shape[-2:] != x.shape[-2:] or mask.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mask must be [B, 1 or C, H, W] matching x {tuple(x.shape)}, got {tuple(mask.shape)}")
    return list(mask.to(x.dtype).split(batch_size))


def _start(x0: torch.Tensor, norm: str, eps: float, generator: torch.Generator | None, mask: torch.Tensor | None) -> torch.Tensor:
    start = random_start(x0, norm, eps, generator)
    return start if mask is None else x0 + (start - x0) * mask


def plain_targeted_pgd(model: nn.Module, x: torch.Tensor, t: torch.Tensor, *, norm: str = "linf", eps: float,
                       steps: int = 20, alpha: float | None = None) -> torch.Tensor:
    """Reference targeted PGD on the classifier alone (no random start): ``x ← Π(x − α·dir(∇ CE(f(x), t)))``.

    The baseline :func:`adaptive_pgd` must reduce to with ``λ = μ = 0``; the L∞ case equals
    torchattacks' ``PGD(random_start=False)`` in targeted mode.
    """
    check_budget(norm, eps)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    model.eval()
    xa = x.clone().detach()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), t), xa)
        xa = project(descent_step(xa.detach(), g, norm, alpha), x, norm, eps).detach()
    return xa


# -- Orthogonal PGD (Bryniarski et al., ICLR 2022) ----------------------------------------
def orthogonalize(g: torch.Tensor, basis: Sequence[torch.Tensor], tol: float = 1e-12) -> torch.Tensor:
    """``g`` minus its projection onto ``span(basis)``, per image (Gram–Schmidt).

    ``g`` and every basis vector are ``[B, ...]`` of the same shape; the result has, per image,
    zero inner product with every basis vector (basis vectors of norm ``≤ tol`` are skipped).
    """
    flat = g.flatten(1).double()
    ortho: list[torch.Tensor] = []
    for b in basis:
        v = b.flatten(1).double()
        for u in ortho:
            v = v - (v * u).sum(1, keepdim=True) * u
        n = v.norm(dim=1, keepdim=True)
        u = torch.where(n > tol, v / n.clamp_min(tol), torch.zeros_like(v))
        ortho.append(u)
    for u in ortho:
        flat = flat - (flat * u).sum(1, keepdim=True) * u
    return flat.to(g.dtype).view_as(g)


def orthogonal_pgd(objective: PipelineObjective, x: torch.Tensor, t: torch.Tensor, *, norm: str = "linf",
                   eps: float, steps: int = 40, alpha: float | None = None, kappa: float = 0.1,
                   mode: str = "orthogonal", rand_init: bool = False, mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, batch_size: int = 250, progress: bool = True,
                   targeted: bool = True, confidence: float = 0.0) -> AttackResult:
    """Orthogonal (or Selective) PGD against the classifier and every layer at once.

    Per image and step: while the classifier does not say ``t``, step on ``∇ CE(f(x), t)``;
    once it does, step on the sum of ``∇ log m_j`` over the layers that currently reject
    (SAEC through :class:`SoftSAEC`, rejecting when ``log m̃ > −κ``; ContraNet exactly).
    ``mode="orthogonal"`` first removes from that gradient its components along the
    *other* objective's gradients (the classifier step is made orthogonal to every layer's
    ``∇ log m``; the detector step orthogonal to ``∇ CE``), so a step on one constraint does
    not undo the other; ``mode="selective"`` steps without projecting.  Images are kept at
    the first iterate the real pipeline accepts as ``t`` (like ``select="pipeline"``).
    ``mask`` restricts the perturbation as in :func:`adaptive_pgd`.  ``targeted=False``: ``t`` are the true
    labels, the classifier step is on the untargeted margin (:meth:`PipelineObjective.classifier_loss`), the
    detector step starts once the classifier says anything but ``y`` (layers judged under its label).
    """
    check_budget(norm, eps)
    if mode not in ("orthogonal", "selective"):
        raise ValueError(f"mode must be 'orthogonal' or 'selective', got {mode!r}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    names = objective.names
    out, succ = [], []
    masks = _mask_chunks(mask, x, batch_size)
    chunks = list(zip(x.split(batch_size), t.split(batch_size), masks))
    bar = tqdm(total=steps * len(chunks), desc=f"{mode} PGD ε={eps:.4g}", disable=not progress, leave=False)
    for xb, tb, mb in chunks:
        x0 = xb.detach()
        xa = _start(x0, norm, eps, generator, mb) if rand_init else x0.clone()
        step_of = torch.full((xb.shape[0],), -1, dtype=torch.long)
        done = 0
        for k in range(steps + 1):
            idx = (step_of < 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xi = xa[idx].detach().requires_grad_(True)
            terms = objective.terms(xi, tb[idx], names, targeted=targeted, confidence=confidence)
            posts = {n: terms[n] for n in names if objective.kind(n) == "post"}
            fooled = objective.verdict(xi, tb[idx], logits=terms["logits"], post_margins=posts, targeted=targeted).fooled
            step_of[idx[fooled]] = k
            if k == steps or fooled.all():
                break
            g_ce = torch.autograd.grad(terms["loss"].sum(), xi, retain_graph=True)[0]
            g_det = {n: torch.autograd.grad(terms[n].sum(), xi, retain_graph=True)[0] for n in names}
            pred = terms["logits"].argmax(1)
            hit = pred == tb[idx] if targeted else pred != tb[idx]
            rejecting = {n: (terms[n] > -kappa).detach() for n in names}
            det_sum = sum(g * rejecting[n].view(-1, 1, 1, 1) for n, g in g_det.items())
            if mode == "orthogonal":
                g_cls = orthogonalize(g_ce, list(g_det.values()))
                g_d = orthogonalize(det_sum, [g_ce])
            else:
                g_cls, g_d = g_ce, det_sum
            grad = torch.where(hit.view(-1, 1, 1, 1), g_d, g_cls)
            if mb is not None:
                grad = grad * mb[idx]
            new = project(descent_step(xi.detach(), grad, norm, alpha), x0[idx], norm, eps)
            keep = ~fooled
            xa[idx[keep]] = new[keep]
            bar.update(1)
            done += 1
        bar.update(steps - done)
        out.append(xa)
        succ.append(step_of)
    bar.close()
    return AttackResult(torch.cat(out), torch.cat(succ), {"norm": norm, "eps": eps, "steps": steps, "alpha": alpha,
                                                          "kappa": kappa, "mode": mode, "targeted": targeted})


# -- the paper's §6 case studies ----------------------------------------------------------
def reconstruction_distance(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """The paper's ``Dist`` ``[B]``: per-image mean squared error + ``(1 − SSIM)`` (both images in [0, 1])."""
    mse = (x - x_rec).flatten(1).pow(2).mean(1)
    return mse + 1.0 - ssim(x_rec, x, data_range=1.0, reduction="none")


def fgsm_on_cgan_input(reconstructor: nn.Module, x: torch.Tensor, t: torch.Tensor, eps: float, steps: int = 1) -> torch.Tensor:
    """§6 (a), Figure 12: targeted FGSM on the cGAN's input ``x [B, C, S, S]`` (the cGAN's size, [0, 1])
    so that ``G(μ(x_adv), t)`` resembles ``x_adv``: ``x_adv = clip(x − ε·sign ∇ Dist(x, G(μ(x), t)))``.

    ``steps = 1`` is the paper's one-step attack; more steps run L∞ PGD with step ``2.5·ε/steps``
    (one FGSM step of size ε overshoots: on MNIST it *raises* Dist, since SSIM punishes the
    noise it adds to the flat background)."""
    check_budget("linf", eps)
    alpha = eps if steps == 1 else 2.5 * eps / steps
    xa = x.detach().clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(reconstruction_distance(xa, reconstructor(xa, t)).sum(), xa)
        xa = project(xa.detach() - alpha * g.sign(), x, "linf", eps).detach()
    return xa


def attack_latent(generator: nn.Module, z: torch.Tensor, t: torch.Tensor, goal: torch.Tensor, eps: float,
                  steps: int = 1) -> torch.Tensor:
    """§6 (b), Figure 13: perturb the latent ``z [B, Z]`` within ``‖δ‖∞ ≤ ε`` (latent units; z ~ N(0, I)
    a priori) so that ``G(z + δ, t)`` resembles ``goal [B, C, S, S]``.  ``steps = 1`` is the paper's
    FGSM; more steps run PGD with step ``2.5·ε/steps`` (a stronger attacker)."""
    check_budget("linf", eps)
    alpha = eps if steps == 1 else 2.5 * eps / steps
    za = z.detach().clone()
    for _ in range(steps):
        za.requires_grad_(True)
        (g,) = torch.autograd.grad(reconstruction_distance(goal, generator(za, t)).sum(), za)
        za = (z + (za.detach() - alpha * g.sign() - z).clamp(-eps, eps)).detach()
    return za

"""Gradient-free attacks on the whole pipeline: Square (score-based) and HopSkipJump (decision-based).

MixDefense has two non-differentiable parts — SAEC's histogram threshold and the classifier's
``argmax`` that picks the label ContraNet judges under — so a gradient attack that fails may
have met masked gradients rather than a robust defense.  Attacks that never look at a
gradient are the standard check (Athalye et al. 2018; Tramèr et al. 2020): if they succeed
where the gradient attacks do not, the gradients were masked.

Conventions (as in :mod:`mixdefense.attacks.adaptive`): images ``x [B, C, H, W]`` float in
``[0, 1]``; budgets ``ε`` in ``[0, 1]`` pixel units, ``‖x_adv − x‖∞ ≤ ε`` (``norm="linf"``)
or the L2 norm of the *whole* image's perturbation (``norm="l2"``); every returned image is
within its budget and ``[0, 1]``.  A *query* is one image shown to the model or pipeline.

The attacks see the model only through callables that take the images and their indices into
the attacked batch (``idx [n]`` int64; the callable needs them to know each image's label):

* ``score_fn(x, idx) -> (loss [n] float, success [n] bool)`` for :func:`square_attack`: a
  per-image objective, lower = closer to success, and the attack's success predicate;
* ``is_adversarial(x, idx) -> [n] bool`` for :func:`hop_skip_jump`: the accept-and-label oracle.

:class:`ClassifierQueries` builds both for a bare classifier (margin loss, as torchattacks'
``Square``); :class:`PipelineQueries` for a whole :class:`~mixdefense.pipeline.MixDefense`: the
classifier's margin plus a penalty for every rejecting layer, and success only when every
layer accepts *and* the label is wrong (untargeted) / the target (targeted) — the deployed
decision, through :meth:`mixdefense.attacks.adaptive.PipelineObjective.verdict`.

* :func:`square_attack` — Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a
  query-efficient black-box adversarial attack via random search", ECCV 2020 (L∞ and L2).
* :func:`hop_skip_jump` — Chen, Jordan, Wainwright, "HopSkipJumpAttack: a query-efficient
  decision-based attack", IEEE S&P 2020 (L2 and L∞), started from pool images the oracle
  already accepts as adversarial.  A minimum-norm attack: at a budget ``ε`` an image is broken
  iff its final AE has norm ``≤ ε`` (:func:`within_budget`), like C&W and DeepFool here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mixdefense.attacks.adaptive import NORMS, PipelineObjective, check_budget, hinge, project

ScoreFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Oracle = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class QueryResult:
    """What a gradient-free attack returns, per image of the batch.

    ``x_adv [B, C, H, W]`` in [0, 1]; ``success [B]`` bool (the success predicate / oracle held for
    ``x_adv``); ``queries [B]`` int64: queries spent on the image (for a success: up to and including
    the first successful one; the clean image's check is not counted by :func:`square_attack`, is by
    :func:`hop_skip_jump`); ``norms [B]``: ``‖x_adv − x‖`` in the attack's norm (``inf`` where
    :func:`hop_skip_jump` found no AE); ``loss [B]``: the best objective value (Square only);
    ``trace [B, T]``: best norm after the start and after each iteration (HopSkipJump only).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    queries: torch.Tensor
    norms: torch.Tensor
    loss: torch.Tensor | None = None
    trace: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def norms_of(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image ``‖x_adv − x‖`` ``[B]`` (L∞: max abs value; L2: over all ``C·H·W`` values)."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def within_budget(result: QueryResult, x: torch.Tensor, eps: float) -> torch.Tensor:
    """A minimum-norm result at budget ``ε``: ``x_adv`` where it succeeded with norm ``≤ ε``, else the
    clean ``x`` (``[B, C, H, W]``); the broken images are ``result.success & (result.norms <= ε)``."""
    broken = result.success & (result.norms <= eps)
    return torch.where(broken.view(-1, 1, 1, 1), result.x_adv, x)


def _ask(fn: Callable, x: torch.Tensor, idx: torch.Tensor, batch_size: int):
    """``fn(x, idx)`` in chunks of ``batch_size`` images, outputs concatenated (a tensor or a tuple of them)."""
    if x.shape[0] <= batch_size:
        return fn(x, idx)
    parts = [fn(xb, ib) for xb, ib in zip(x.split(batch_size), idx.split(batch_size))]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty [B, C, H, W] batch, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("x must be finite and in [0, 1]")


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


# -- what the attacker queries ---------------------------------------------------------------
def class_margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """``[B]`` classifier margin, ``< 0`` where the attack's goal holds: untargeted
    ``z_y − max_{k≠y} z_k`` (``labels`` = true labels), targeted ``max_{k≠t} z_k − z_t`` (``labels`` = targets)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return others - own if targeted else own - others


class ClassifierQueries:
    """The bare classifier as a query target (the oblivious setting, for validation).

    ``score(x, idx)``: margin loss :func:`class_margin` and success = ``argmax ≠ y`` (untargeted) /
    ``= t`` (targeted); ``is_adversarial(x, idx)``: the same success.  ``labels [B]``: true labels
    (untargeted) or targets (targeted) of the attacked batch, indexed by ``idx``.
    """

    def __init__(self, model: nn.Module, labels: torch.Tensor, targeted: bool = False):
        self.model, self.labels, self.targeted = model.eval(), labels, targeted

    def _hit(self, logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        pred = logits.argmax(1)
        return pred == lab if self.targeted else pred != lab

    @torch.no_grad()
    def score(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        lab = self.labels[idx]
        return class_margin(logits, lab, self.targeted), self._hit(logits, lab)

    @torch.no_grad()
    def is_adversarial(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self._hit(self.model(x), self.labels[idx])


class PipelineQueries:
    """A whole :class:`~mixdefense.pipeline.MixDefense` (through its :class:`PipelineObjective`) as a query target.

    Success (both methods) is the deployed decision: every layer accepts — pre layers on ``x``,
    post layers under the label the classifier gives, i.e. ``layer_table``'s margins all ``≤ 1`` —
    and that label is wrong (untargeted) or the target (targeted); it is computed by
    :meth:`PipelineObjective.verdict`.  The score-based loss (lower = closer) is

        ``max(m_f, −confidence) + λ · Σ_layers relu(log m_j + κ)``

    with ``m_f`` the classifier margin (:func:`class_margin`) and ``m_j`` each layer's margin
    (post layers judged under the target, or under the predicted label when untargeted): once
    the classifier is fooled by ``confidence``, only the rejecting layers count.

    Args:
        objective: the pipeline's :class:`PipelineObjective` (``differentiable=False`` is enough).
        labels: ``[B]`` true labels (untargeted) or targets (targeted) of the attacked batch.
        kappa: hinge offset on log margins (a layer's term vanishes below ``log m = −κ``).
        lam: weight ``λ ≥ 0`` of the layers' penalty.
        confidence: ``≥ 0``, in logits.
    """

    def __init__(self, objective: PipelineObjective, labels: torch.Tensor, *, targeted: bool, kappa: float = 0.1,
                 lam: float = 1.0, confidence: float = 0.0):
        if lam < 0 or confidence < 0 or kappa < 0:
            raise ValueError(f"need lam, confidence, kappa >= 0; got {lam}, {confidence}, {kappa}")
        self.objective, self.labels, self.targeted = objective, labels, targeted
        self.kappa, self.lam, self.confidence = float(kappa), float(lam), float(confidence)

    def _judged(self, logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """The label the post layers judge under: the target, or the classifier's label (untargeted)."""
        return lab if self.targeted else logits.argmax(1)

    def _success(self, verdict, logits: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return verdict.fooled if self.targeted else verdict.fooled & (logits.argmax(1) != lab)

    @torch.no_grad()
    def score(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lab = self.labels[idx]
        logits = self.objective.classifier(x)
        judged = self._judged(logits, lab)
        penalty = torch.zeros(x.shape[0], device=x.device)
        post: dict[str, torch.Tensor] = {}
        for layer in self.objective.layers:
            m = layer.margin(x) if layer.kind == "pre" else layer.margin(x, judged)
            log_m = m.clamp_min(1e-12).log()
            penalty = penalty + hinge(log_m, self.kappa)
            if layer.kind == "post":
                post[layer.name] = log_m
        v = self.objective.verdict(x, judged, logits=logits, post_margins=post)
        loss = class_margin(logits, lab, self.targeted).clamp_min(-self.confidence) + self.lam * penalty
        return loss, self._success(v, logits, lab)

    @torch.no_grad()
    def is_adversarial(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        lab = self.labels[idx]
        logits = self.objective.classifier(x)
        return self._success(self.objective.verdict(x, self._judged(logits, lab), logits=logits), logits, lab)


# -- Square attack ---------------------------------------------------------------------------
def square_p(p_init: float, iteration: int, horizon: int) -> float:
    """The paper's schedule of ``p`` (fraction of the image a square covers) at ``iteration`` (0 =
    the first after the initialisation): ``p_init`` halved at 10, 50, 200, 500, 1000, 2000, 4000,
    6000, 8000 of 10,000 iterations, rescaled to ``horizon`` iterations (the authors' code)."""
    it = int(iteration / horizon * 10000)
    for k, edge in enumerate((10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)):
        if it <= edge:
            return p_init / 2 ** k
    return p_init / 512


def _windows(n: int, s: int, h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``s × s`` windows, one per image: row and column indices ``[n, s]`` each."""
    top = torch.randint(0, h - s + 1, (n, 1), generator=gen)
    left = torch.randint(0, w - s + 1, (n, 1), generator=gen)
    ar = torch.arange(s)[None]
    return top + ar, left + ar


def _window_index(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple:
    """Advanced index of each image's window in ``t [n, C, H, W]`` (gives ``[n, C, s, s]``)."""
    n, c = t.shape[:2]
    return (torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
            rows[:, None, :, None].to(t.device), cols[:, None, None, :].to(t.device))


def _signs(shape: tuple, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def _eta_rectangle(a: int, b: int) -> torch.Tensor:
    """``[a, b]``: nested rectangles weighted ``1/(k+1)²`` around the centre, unit L2 norm (the paper's η building block)."""
    delta = torch.zeros(a, b)
    r0, c0 = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        delta[max(r0 - k, 0):min(r0 + k + 1, a), max(c0 - k, 0):min(c0 + k + 1, b)] += 1.0 / (k + 1) ** 2
    return delta / delta.norm()


def square_eta(s: int) -> torch.Tensor:
    """The L2 attack's ``s × s`` update shape η (the paper's L2 section): two rectangles of opposite sign, unit L2 norm."""
    delta = torch.zeros(s, s)
    delta[: s // 2] = _eta_rectangle(s // 2, s) if s // 2 > 0 else 0
    delta[s // 2:] = -_eta_rectangle(s - s // 2, s)
    return delta / delta.norm()


def _square_init(x: torch.Tensor, norm: str, eps: float, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The paper's starting points: vertical stripes of ``±ε`` (one sign per column and channel, L∞), or a grid
    of ``η`` bumps with random signs rescaled to norm ``ε`` (L2); within the budget and [0, 1]."""
    n, c, h, w = x.shape
    if norm == "linf":
        delta = eps * _signs((n, c, 1, w), gen).to(x) * mask
        return project((x + delta).clamp(0, 1), x, norm, eps)
    s = max(h // 5, 1)
    delta = torch.zeros_like(x)
    top = (h - s * 5) // 2
    for i in range(h // s):
        for j in range(w // s):
            r, q = top + i * s, (w - s * 5) // 2 + j * s
            if r < 0 or q < 0 or r + s > h or q + s > w:
                continue
            bump = square_eta(s)
            if torch.rand(1, generator=gen).item() > 0.5:
                bump = bump.T
            delta[:, :, r:r + s, q:q + s] += bump.to(x) * _signs((n, c, 1, 1), gen).to(x)
    delta = delta * mask
    delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps
    return project((x + delta).clamp(0, 1), x, norm, eps)


def _linf_candidates(x: torch.Tensor, best: torch.Tensor, mask: torch.Tensor, eps: float, s: int,
                     gen: torch.Generator, tries: int = 10) -> torch.Tensor:
    """Each image's best point with one random ``s × s`` window (all channels) set to ``x ± ε`` (a random
    sign per channel), clipped to [0, 1].  A window that would not change the image (clipping, or outside
    the mask) is drawn again, up to ``tries`` times (the authors' code redraws the sign)."""
    n, c, h, w = x.shape
    cand = best.clone()
    todo = torch.arange(n)
    for _ in range(tries):
        rows, cols = _windows(len(todo), s, h, w, gen)
        sign = _signs((len(todo), c, 1, 1), gen).to(x)
        ix = _window_index(x[todo], rows, cols)
        xw, bw, mw = x[todo][ix], best[todo][ix], mask.expand_as(x)[todo][ix]
        new = (xw + sign * eps).clamp(0, 1) * mw + xw * (1 - mw)
        sub = cand[todo]
        sub[ix] = new
        cand[todo] = sub
        same = ((new - bw).abs() <= 1e-7).flatten(1).all(1)
        todo = todo[same]
        if todo.numel() == 0:
            break
    return cand


def _l2_candidates(x: torch.Tensor, best: torch.Tensor, mask: torch.Tensor, eps: float, s: int,
                   gen: torch.Generator) -> torch.Tensor:
    """The paper's L2 step, per image: window 1 gets ``η`` (random sign per channel, random
    transposition) plus its old content, rescaled to carry the budget left and window 2's mass; window 2
    is zeroed; the whole perturbation is rescaled to norm ``ε`` and the image clipped to [0, 1]."""
    n, c, h, w = x.shape
    delta = best - x
    r1, c1 = _windows(n, s, h, w, gen)
    r2, c2 = _windows(n, s, h, w, gen)
    ix1, ix2 = _window_index(delta, r1, c1), _window_index(delta, r2, c2)
    union = torch.zeros_like(delta[:, :1])
    union[_window_index(union, r1, c1)] = 1.0
    union[_window_index(union, r2, c2)] = 1.0
    old = delta[ix1]
    old = old / (old.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12)
    mass = (delta * union).pow(2).sum((-2, -1), keepdim=True)  # [n, C, 1, 1]
    left = (eps ** 2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0).view(-1, 1, 1, 1) / c
    eta = square_eta(s).to(x)
    flip = torch.rand(n, generator=gen) > 0.5
    eta = torch.where(flip.view(-1, 1, 1, 1).to(x.device), eta.T[None, None], eta[None, None])  # [n, 1, s, s]
    new = eta * _signs((n, c, 1, 1), gen).to(x) + old
    new = new / (new.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12) * (left + mass).sqrt()
    delta[ix2] = 0.0
    delta[ix1] = new
    delta = delta * mask
    delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps
    return project((x + delta).clamp(0, 1), x, "l2", eps)


def _square_run(score_fn: ScoreFn, x: torch.Tensor, idx: torch.Tensor, norm: str, eps: float, n_queries: int,
                p_init: float, horizon: int, mask: torch.Tensor, gen: torch.Generator, batch_size: int,
                bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One run of the Square attack on ``x [n, ...]`` (batch indices ``idx``): ``(x_best, loss, success, queries)``."""
    n, c, h, w = x.shape
    best = _square_init(x, norm, eps, mask, gen)
    loss, succ = _ask(score_fn, best, idx, batch_size)
    loss, succ = loss.clone(), succ.clone()
    queries = torch.ones(n, dtype=torch.long)
    for i in range(n_queries - 1):
        active = (~succ).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        p = square_p(p_init, i, horizon)
        side = round(math.sqrt(p * h * w))
        if norm == "linf":
            s = min(max(side, 1), min(h, w) - 1)
            cand = _linf_candidates(x[active], best[active], mask[active] if mask.shape[0] > 1 else mask, eps, s, gen)
        else:
            m = min(h, w) - 1
            s = max(min(max(side, 3) | 1, m if m % 2 else m - 1), 1)  # odd, >= 3 (the authors' code), fits the image
            cand = _l2_candidates(x[active], best[active], mask[active] if mask.shape[0] > 1 else mask, eps, s, gen)
        new_loss, new_succ = _ask(score_fn, cand, idx[active], batch_size)
        better = (new_loss < loss[active]) | new_succ
        take = active[better]
        best[take] = cand[better]
        loss[take] = new_loss[better]
        succ[active] = succ[active] | new_succ
        queries[active.cpu()] += 1
        bar.update(1)
    return best, loss, succ, queries


def square_attack(score_fn: ScoreFn, x: torch.Tensor, *, norm: str = "linf", eps: float, n_queries: int = 1000,
                  p_init: float = 0.8, restarts: int = 1, horizon: int | None = None, mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, batch_size: int = 500, progress: bool = True) -> QueryResult:
    """Score-based Square attack (Andriushchenko et al., ECCV 2020), L∞ or L2, on a per-image objective.

    Random search: start at the paper's initialisation (vertical ``±ε`` stripes for L∞, a grid
    of ``η`` bumps for L2); then, per image and query, change one random square (side
    ``≈ √(p·H·W)``, ``p`` from :func:`square_p`) and keep the change when the loss drops.  An
    image is queried no more once ``success`` holds (and its successful point is kept).

    Args:
        score_fn: ``(x [n, C, H, W], idx [n]) -> (loss [n], success [n] bool)``, lower loss = closer
            (e.g. :meth:`PipelineQueries.score`, :meth:`ClassifierQueries.score`).
        x: clean images ``[B, C, H, W]`` in [0, 1] (the clean images are not queried).
        norm, eps: the budget (module docstring).
        n_queries: queries per image and restart (initialisation included).
        p_init: the schedule's initial square fraction; 0.8 is the authors' setting on MNIST (and
            AutoAttack's / torchattacks' default).
        restarts: runs; each later run attacks, from a fresh initialisation, the images not yet
            successful and replaces their point where its loss is lower.
        horizon: iterations the ``p`` schedule spans (default ``n_queries``, the authors' rescaling).
            With a fixed ``horizon`` and one restart, a run with more queries repeats a shorter one
            query for query, so success never drops as ``n_queries`` grows.
        mask: optional ``[B or 1, 1 or C, H, W]`` in {0, 1}: only these values are ever perturbed.
        generator: the seeded source of every random draw (default: seed 0); the result depends
            only on it and on the batch.
        batch_size: images per ``score_fn`` call.

    Returns:
        :class:`QueryResult` (``loss``: best loss; ``norms`` in ``norm``).
    """
    check_budget(norm, eps)
    _check_images(x)
    if n_queries < 1 or restarts < 1 or batch_size < 1:
        raise ValueError(f"need n_queries, restarts, batch_size >= 1; got {n_queries}, {restarts}, {batch_size}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    horizon = n_queries if horizon is None else horizon
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    b = x.shape[0]
    if mask is None:
        mask = torch.ones(1, 1, *x.shape[-2:], dtype=x.dtype, device=x.device)
    elif mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, x.shape[1]) or mask.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask must be [B or 1, 1 or C, H, W] matching x {tuple(x.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(x)
    gen = _generator(generator)
    x = x.detach()
    x_adv, loss = x.clone(), torch.full((b,), float("inf"), device=x.device)
    success, queries = torch.zeros(b, dtype=torch.bool, device=x.device), torch.zeros(b, dtype=torch.long)
    bar = tqdm(total=restarts * (n_queries - 1), desc=f"Square {norm} ε={eps:.4g}", disable=not progress, leave=False)
    for _ in range(restarts):
        todo = (~success).nonzero().squeeze(1).cpu()
        if todo.numel() == 0:
            break
        m = mask[todo.to(mask.device)] if mask.shape[0] > 1 else mask
        best, l_run, s_run, q_run = _square_run(score_fn, x[todo], todo, norm, eps, n_queries, p_init, horizon, m, gen,
                                                batch_size, bar)
        queries[todo] += q_run
        better = (l_run < loss[todo]) | s_run
        keep = todo[better.cpu()]
        x_adv[keep], loss[keep] = best[better], l_run[better]
        success[todo] = s_run
    bar.close()
    info = {"attack": "square", "norm": norm, "eps": eps, "n_queries": n_queries, "p_init": p_init, "restarts": restarts,
            "horizon": horizon}
    return QueryResult(x_adv, success, queries, norms_of(x_adv, x, norm), loss=loss, info=info)


# -- HopSkipJump -----------------------------------------------------------------------------
GEOMETRIC_HALVINGS = 25  # step-size halvings tried before a step is given up (2^-25 of the distance)


def _project_towards(x0: torch.Tensor, xa: torch.Tensor, alpha: torch.Tensor, norm: str) -> torch.Tensor:
    """Points between ``x0`` and ``xa`` (``[n, C, H, W]``): L2 ``(1 − α)·x0 + α·xa`` (``α ∈ [0, 1]``);
    L∞ ``xa`` clipped to the box ``x0 ± α`` (``α ∈ [0, ‖xa − x0‖∞]``)."""
    a = alpha.view(-1, 1, 1, 1)
    if norm == "l2":
        return (1 - a) * x0 + a * xa
    return torch.minimum(torch.maximum(xa, x0 - a), x0 + a)


def _binary_search(oracle: Oracle, x0: torch.Tensor, xa: torch.Tensor, idx: torch.Tensor, norm: str, theta: float,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boundary points between clean ``x0`` and adversarial ``xa`` (``[n, C, H, W]``), per image: the
    adversarial end of a bisection stopped at relative tolerance ``θ``.  ``(points, queries [n])``."""
    n = x0.shape[0]
    if norm == "l2":
        high, thr = torch.ones(n, device=x0.device), torch.full((n,), theta, device=x0.device)
    else:
        high = norms_of(xa, x0, "linf")
        thr = torch.clamp(high * theta, max=theta).clamp_min(1e-30)
    low = torch.zeros_like(high)
    queries = torch.zeros(n, dtype=torch.long)
    for _ in range(binary_search_steps(theta)):  # the bound the query budget reserves; the tolerance ends it first
        todo = ((high - low) / thr > 1).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        mid = (high[todo] + low[todo]) / 2
        adv = _ask(oracle, _project_towards(x0[todo], xa[todo], mid, norm), idx[todo], batch_size)
        high[todo] = torch.where(adv, mid, high[todo])
        low[todo] = torch.where(adv, low[todo], mid)
        queries[todo.cpu()] += 1
    return _project_towards(x0, xa, high, norm), queries


def binary_search_steps(theta: float) -> int:
    """Queries one :func:`_binary_search` takes at most: ``⌈log2(1/θ)⌉`` halvings reach the tolerance, +1 for rounding."""
    return math.ceil(math.log2(1.0 / theta)) + 1


def _find_starts(oracle: Oracle, x: torch.Tensor, idx: torch.Tensor, pool: torch.Tensor, norm: str, candidates: int,
                 chunk: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image, the nearest (in ``norm``) pool image the oracle calls adversarial for it, among its
    ``candidates`` nearest ones, asked ``chunk`` at a time nearest first.  ``(starts, found [n], queries [n])``."""
    n = x.shape[0]
    dist = torch.cdist(x.flatten(1), pool.flatten(1).to(x), p=float("inf") if norm == "linf" else 2.0)
    dist = dist.masked_fill(dist <= 1e-12, float("inf"))  # the image itself is no start
    k = min(candidates, pool.shape[0])
    near_d, near = dist.topk(k, dim=1, largest=False)  # [n, k], nearest first
    starts, found = x.clone(), torch.zeros(n, dtype=torch.bool, device=x.device)
    queries = torch.zeros(n, dtype=torch.long)
    for lo in range(0, k, chunk):
        todo = (~found).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        cols = near[todo, lo:lo + chunk]
        ok_d = torch.isfinite(near_d[todo, lo:lo + chunk])
        owner = todo[:, None].expand_as(cols)[ok_d]
        if owner.numel() == 0:
            continue
        adv = torch.zeros_like(cols, dtype=torch.bool)
        adv[ok_d] = _ask(oracle, pool[cols[ok_d]].to(x), idx[owner], batch_size)
        queries[todo.cpu()] += ok_d.sum(1).cpu()
        hit = adv.any(1)
        first = adv.int().argmax(1)  # nearest adversarial candidate of the chunk
        rows = todo[hit]
        starts[rows] = pool[cols[hit, first[hit]]].to(x)
        found[rows] = True
    return starts, found, queries


def _estimate_gradients(oracle: Oracle, points: torch.Tensor, idx: torch.Tensor, evals: torch.Tensor, delta: torch.Tensor,
                        norm: str, gen: torch.Generator, batch_size: int) -> torch.Tensor:
    """Monte-Carlo estimate of the boundary's normal at ``points [n, C, H, W]`` (HSJA's estimate with
    its baseline subtraction): ``evals[i]`` random unit directions ``u`` (Gaussian for L2, uniform in the cube for
    L∞), the oracle's ±1 at ``clip(x + δ_i·u)``, ``Σ (φ − mean φ)·u``.  Returns unit vectors ``[n, C, H, W]``."""
    n = points.shape[0]
    grads = torch.zeros_like(points)
    e_max = int(evals.max())
    group = max(1, batch_size // e_max)
    for lo in range(0, n, group):
        sl = slice(lo, lo + group)
        p, e, d = points[sl], evals[sl].to(points.device), delta[sl].view(-1, 1, 1, 1, 1)
        g = p.shape[0]
        shape = (g, e_max, *p.shape[1:])
        u = torch.randn(shape, generator=gen) if norm == "l2" else torch.rand(shape, generator=gen) * 2 - 1
        u = u.to(p)
        u = u / u.flatten(2).norm(dim=2).clamp_min(1e-12).view(g, e_max, 1, 1, 1)
        probe = (p[:, None] + d * u).clamp(0, 1)
        u = (probe - p[:, None]) / d
        valid = torch.arange(e_max, device=p.device)[None] < e[:, None]  # [g, e_max]
        owner = idx[sl][:, None].expand(g, e_max)[valid]
        phi = torch.zeros(g, e_max, device=p.device)
        phi[valid] = _ask(oracle, probe[valid], owner, batch_size).float() * 2 - 1
        mean = phi.sum(1, keepdim=True) / e[:, None]
        mixed = (mean.abs() < 1).view(-1, 1)
        w = torch.where(mixed, phi - mean, phi) * valid
        est = (w.view(g, e_max, 1, 1, 1) * u).sum(1) / e.view(-1, 1, 1, 1)
        grads[sl] = est / est.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return grads


def _geometric_step(oracle: Oracle, points: torch.Tensor, update: torch.Tensor, idx: torch.Tensor, step: torch.Tensor,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HSJA's geometric step-size search: halve ``step [n]`` until ``clip(x + step·update)`` is adversarial
    (at most :data:`GEOMETRIC_HALVINGS` + 1 queries; a step that never lands stays at ``x``).  ``(new points, queries)``."""
    n = points.shape[0]
    out = points.clone()
    queries = torch.zeros(n, dtype=torch.long)
    todo = torch.arange(n, device=points.device)
    step = step.clone()
    for _ in range(GEOMETRIC_HALVINGS + 1):
        if todo.numel() == 0:
            break
        cand = (points[todo] + step[todo].view(-1, 1, 1, 1) * update[todo]).clamp(0, 1)
        adv = _ask(oracle, cand, idx[todo], batch_size)
        queries[todo.cpu()] += 1
        out[todo[adv]] = cand[adv]
        step[todo] = step[todo] / 2
        todo = todo[~adv]
    return out, queries


def hop_skip_jump(is_adversarial: Oracle, x: torch.Tensor, pool: torch.Tensor, *, norm: str = "l2",
                  max_queries: int = 5000, iterations: int | None = None, gamma: float = 1.0, init_evals: int = 100,
                  max_evals: int = 10_000, start_candidates: int = 200, start_chunk: int = 10,
                  generator: torch.Generator | None = None, batch_size: int = 1000, progress: bool = True) -> QueryResult:
    """Decision-based HopSkipJump (Chen, Jordan, Wainwright, IEEE S&P 2020), L2 or L∞, minimum-norm.

    Per image: (1) a start — the nearest of its ``start_candidates`` nearest ``pool`` images the
    oracle accepts as adversarial (e.g. test images of another class that the pipeline accepts);
    (2) a bisection to the boundary between ``x`` and the start; then, per iteration ``j``:
    estimate the boundary's normal from ``min(init_evals·√j, max_evals)`` sign queries at radius
    ``δ`` (0.1 at ``j = 1``, then ``√d·θ·dist`` (L2) or ``d·θ·dist`` (L∞)), step along it (its sign
    for L∞) with the geometric search from ``dist/√j``, and bisect back to the boundary
    (tolerance ``θ = γ/d^{3/2}`` (L2) or ``γ/d²`` (L∞), ``d = C·H·W``).  The point kept is the
    closest AE seen (so the returned norm never grows with iterations); every returned success is
    a point the oracle called adversarial.

    Args:
        is_adversarial: ``(x [n, C, H, W], idx [n]) -> [n] bool`` (e.g. :meth:`PipelineQueries.is_adversarial`).
        x: clean images ``[B, C, H, W]`` in [0, 1]; an image the oracle already calls adversarial is
            returned as it is (norm 0).
        pool: candidate starts ``[P, C, H, W]`` in [0, 1] (an image equal to ``x`` is skipped).
        norm: ``"l2"`` or ``"linf"``: the distance minimised and reported.
        max_queries: per image, all included (clean check, start search, bisections); never exceeded:
            an iteration starts only with its worst-case cost left (its gradient estimate shrinks to fit).
        iterations: at most this many iterations (default: until the budget is spent).
        generator: the seeded source of every random draw (default: seed 0).
        batch_size: queries per oracle call.

    Returns:
        :class:`QueryResult`: ``norms`` (``inf`` and ``x_adv = x`` where no start was found), ``trace [B, T]``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    _check_images(x)
    if pool.dim() != 4 or pool.shape[1:] != x.shape[1:] or pool.shape[0] == 0:
        raise ValueError(f"pool must be [P, C, H, W] matching x {tuple(x.shape)}, got {tuple(pool.shape)}")
    if min(max_queries, init_evals, max_evals, start_candidates, start_chunk, batch_size) < 1 or gamma <= 0:
        raise ValueError("max_queries, init_evals, max_evals, start_candidates, start_chunk, batch_size must be >= 1 "
                         f"and gamma > 0; got {max_queries}, {init_evals}, {max_evals}, {start_candidates}, "
                         f"{start_chunk}, {batch_size}, {gamma}")
    if iterations is not None and iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    gen = _generator(generator)
    x = x.detach()
    b = x.shape[0]
    d = x[0].numel()
    theta = gamma / (d * math.sqrt(d)) if norm == "l2" else gamma / d ** 2
    bs_steps = binary_search_steps(theta)
    reserve = GEOMETRIC_HALVINGS + 1 + bs_steps  # worst case of an iteration beyond its gradient estimate
    all_idx = torch.arange(b, device=x.device)
    queries = torch.ones(b, dtype=torch.long)
    clean_adv = _ask(is_adversarial, x, all_idx, batch_size)
    best = x.clone()
    best_d = torch.where(clean_adv, 0.0, float("inf")).to(x)
    # (1) starts, within the budget left after the first bisection
    need = (~clean_adv).nonzero().squeeze(1)
    n_cand = min(start_candidates, max_queries - 1 - bs_steps)
    found = torch.zeros(b, dtype=torch.bool, device=x.device)
    cur = x.clone()
    if need.numel() and n_cand > 0:
        starts, ok, q = _find_starts(is_adversarial, x[need], need, pool, norm, n_cand, start_chunk, batch_size)
        queries[need.cpu()] += q
        found[need[ok]] = True
        # (2) to the boundary
        have = need[ok]
        if have.numel():
            pts, q = _binary_search(is_adversarial, x[have], starts[ok], have, norm, theta, batch_size)
            queries[have.cpu()] += q
            cur[have] = pts
            best[have], best_d[have] = pts, norms_of(pts, x[have], norm)
    dist = best_d.clone()
    dist_post = dist.clone()
    trace = [best_d.clone()]
    j = 0
    bar = tqdm(desc=f"HopSkipJump {norm}", total=iterations, disable=not progress, leave=False)
    while iterations is None or j < iterations:
        j += 1
        nominal = min(int(init_evals * math.sqrt(j)), max_evals)
        room = (max_queries - queries).to(x.device) - reserve
        active = (found & (room >= 1)).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        evals = torch.clamp(room[active], max=nominal).cpu()
        ia = active
        delta = torch.full((len(ia),), 0.1, device=x.device) if j == 1 else (
            math.sqrt(d) * theta * dist_post[ia] if norm == "l2" else d * theta * dist_post[ia])
        delta = delta.clamp_min(1e-12)
        grad = _estimate_gradients(is_adversarial, cur[ia], ia, evals, delta, norm, gen, batch_size)
        queries[ia.cpu()] += evals
        update = grad.sign() if norm == "linf" else grad
        stepped, q = _geometric_step(is_adversarial, cur[ia], update, ia, dist[ia] / math.sqrt(j), batch_size)
        queries[ia.cpu()] += q
        dist_post[ia] = norms_of(stepped, x[ia], norm)
        pts, q = _binary_search(is_adversarial, x[ia], stepped, ia, norm, theta, batch_size)
        queries[ia.cpu()] += q
        cur[ia] = pts
        dist[ia] = norms_of(pts, x[ia], norm)
        better = dist[ia] < best_d[ia]
        best[ia[better]], best_d[ia[better]] = pts[better], dist[ia[better]]
        trace.append(best_d.clone())
        bar.update(1)
    bar.close()
    success = torch.isfinite(best_d)
    info = {"attack": "hopskipjump", "norm": norm, "max_queries": max_queries, "iterations_run": len(trace) - 1,
            "gamma": gamma, "theta": theta, "init_evals": init_evals, "max_evals": max_evals,
            "start_candidates": start_candidates, "pool": int(pool.shape[0])}
    return QueryResult(best, success, queries, best_d, trace=torch.stack(trace, 1), info=info)


__all__ = ["ClassifierQueries", "PipelineQueries", "QueryResult", "class_margin", "hop_skip_jump", "norms_of",
           "square_attack", "square_eta", "square_p", "within_budget"]

"""ContraNet, MixDefense's SP-defense layer (paper §4, Figure 3): a plain ``nn.Module`` detector.

For an input ``x [B, C, S, S]`` in ``[0, 1]`` and a label ``y [B]`` (at inference: the target
classifier's *predicted* label):

1. reconstruct ``x′ = G(μ(x), y)`` with the frozen revised cGAN (:class:`~mixdefense.nets.Reconstructor`);
2. score the contradiction between ``x`` and ``x′`` with one or more distances
   (:data:`SCORES`), each ``≥ 0`` and 0 for ``x′ = x``:

   * ``metric`` — ``d(M(x), M(x′))`` with the triplet-trained embedding net M (paper §4.2);
   * ``l2`` — ``‖x − x′‖₂`` over the whole image (pixel scale);
   * ``ssim`` — ``1 − SSIM(x, x′)`` (torchmetrics, data range 1);

3. reject (``True`` = adversarial) when a score exceeds its threshold.  With several scores
   the decision is their OR (the authors' follow-up code combines M with SSIM this way).

**Contrast with the runner-up labels** (MixDefense+, not the paper; ``contrast_labels = k > 1``):
the ``metric`` score becomes ``d_y + w · (2 − min_j d_j)``, ``d_y = d(M(x), M(G(μ(x), y)))`` and
``d_j`` the same distance for the classifier's ``k − 1`` most likely labels other than ``y``
(``w`` = ``contrast_weight``; embedding distances lie in ``[0, 2]``, so the score stays ``≥ 0``).
An image that no label reconstructs well (a new sign, odd lighting) has large ``d_j`` too, and
its score drops; an AE pushed from its label ``y₀`` to ``y`` keeps ``y₀`` among the runner-ups,
reconstructs well from it, and its score rises.  The runner-ups come from the classifier the
pipeline binds (:meth:`bind`), under ``torch.no_grad`` (no gradient through the ranking).
``contrast_labels = 1`` (the default) is the paper's score.

:meth:`ContraNet.score` returns one number per image: the raw score for a single-score
detector, and ``max_k s_k / t_k`` (rejected iff ``> 1``) for an OR of several.

Calibration (:meth:`ContraNet.calibrate`): thresholds come from *clean* images only (a
validation split, with the labels the classifier predicts for them, as at inference), at
a target false-rejection rate (default 5 %).  For an OR of ``k`` scores every score is cut
at the same per-score quantile level ``q``, the largest ``q`` whose combined clean
rejection stays ``≤`` the target.  Thresholds and the calibration record are buffers and
attributes saved with the module (:meth:`ContraNet.save`).

Gradients: :meth:`ContraNet.detect` takes the label from the classifier under
``torch.no_grad`` as an integer argmax, so the classifier's and ContraNet's gradients never
share a path; :meth:`score` itself is differentiable in ``x`` (adaptive attacks need that).
Inputs whose side differs from the cGAN's (e.g. 28×28 MNIST for a 32×32 cGAN) are resized
(bilinear, antialiased) before reconstruction; inputs must be square and at least
:data:`MIN_SIDE` pixels on a side (anything else is a ``ValueError``, never a guess).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from mixdefense.classifiers import UsesClassifier
from mixdefense.io import build_configured, configured_payload
from mixdefense.layers.base import DetectorLayer, register_layer
from mixdefense.layers.thresholds import or_calibrate
from mixdefense.nets.cgan import Reconstructor
from mixdefense.nets.metric import EmbeddingNet, embedding_distance
from mixdefense.validation import check_images, check_labels, match_dtype

SCORES = ("metric", "l2", "ssim")
#: the largest embedding distance (normalised embeddings, ``l2`` and ``cosine``): the contrast term's offset
MAX_EMBEDDING_DISTANCE = 2.0
#: smallest input side accepted; other square sizes are resized to the cGAN's (e.g. 28 → 32)
MIN_SIDE = 8


@dataclass
class Calibration:
    """How the thresholds were set: on ``num_images`` clean images at ``target_frr``."""

    scores: list[str]
    thresholds: list[float]
    target_frr: float
    achieved_frr: float  # clean rejection of the combined detector on the calibration images
    per_score_frr: list[float]
    quantile_level: float  # per-score rejection level q used for every score
    num_images: int

    def as_dict(self) -> dict:
        return asdict(self)


def image_scores(x: torch.Tensor, x_rec: torch.Tensor, which: Sequence[str], metric: nn.Module | None = None,
                 distance: str = "l2") -> dict[str, torch.Tensor]:
    """The named scores ``[B]`` (see :data:`SCORES`) between images and their reconstructions."""
    out: dict[str, torch.Tensor] = {}
    for name in which:
        if name == "metric":
            if metric is None:
                raise ValueError("the 'metric' score needs an embedding net M")
            out[name] = embedding_distance(metric(x), metric(x_rec), distance)
        elif name == "l2":
            out[name] = (x - x_rec).flatten(1).norm(dim=1)
        elif name == "ssim":
            out[name] = 1.0 - ssim(x_rec, x, data_range=1.0, reduction="none")
        else:
            raise ValueError(f"unknown score {name!r}; choose from {SCORES}")
    return out


@register_layer
class ContraNet(UsesClassifier, DetectorLayer):
    """The SP-defense detector: reconstruct with the predicted label, measure, threshold.

    A *post-classifier* layer of :class:`mixdefense.pipeline.MixDefense` (``kind = "post"``):
    ``forward(x, y_pred)``.

    Args:
        reconstructor: the trained cGAN's encoder and generator (frozen here).
        metric: the triplet-trained embedding net M (needed for the ``metric`` score).
        scores: the distances to use (``("metric",)``, ``("metric", "ssim")`` …); OR-combined.
        distance: embedding distance of M (``"l2"`` or ``"cosine"``), as in its training.
        contrast_labels: ``k``; ``> 1`` contrasts the ``metric`` score with the classifier's ``k − 1``
            runner-up labels (module docstring; needs ``metric`` among the scores and a bound classifier).
        contrast_weight: ``w ≥ 0``, the runner-ups' weight in the contrast (unused for ``k = 1``).

    Shapes: ``x [B, C, H, W]`` float in ``[0, 1]`` (``C`` = the cGAN's channels), ``y [B]`` int64.
    """

    type_name = "contranet"
    file_format = "mixdefense.contranet/1"
    kind = "post"  # sees the input and the classifier's predicted label

    def __init__(self, reconstructor: Reconstructor, metric: EmbeddingNet | None = None,
                 scores: Sequence[str] = ("metric",), distance: str = "l2", contrast_labels: int = 1,
                 contrast_weight: float = 0.5):
        super().__init__()
        scores = tuple(scores)
        if not scores or any(s not in SCORES for s in scores) or len(set(scores)) != len(scores):
            raise ValueError(f"scores must be distinct names from {SCORES}, got {scores}")
        if "metric" in scores and metric is None:
            raise ValueError("the 'metric' score needs an embedding net M (metric=...)")
        if not isinstance(contrast_labels, int) or isinstance(contrast_labels, bool) or \
                not 1 <= contrast_labels <= reconstructor.num_classes:
            raise ValueError(f"contrast_labels must be an integer in [1, {reconstructor.num_classes}], got {contrast_labels!r}")
        if contrast_labels > 1 and "metric" not in scores:
            raise ValueError("contrast_labels > 1 contrasts the 'metric' score: add 'metric' to scores")
        if not isinstance(contrast_weight, (int, float)) or not contrast_weight >= 0:
            raise ValueError(f"contrast_weight must be a number >= 0, got {contrast_weight!r}")
        self.contrast_labels, self.contrast_weight = contrast_labels, float(contrast_weight)
        self._classifier: list[nn.Module] = []  # see UsesClassifier (needed for contrast_labels > 1)
        if metric is not None and metric.in_channels != reconstructor.in_channels:
            raise ValueError(f"M takes {metric.in_channels} channels, the cGAN {reconstructor.in_channels}")
        self.reconstructor = reconstructor.eval().requires_grad_(False)
        self.metric = metric.eval().requires_grad_(False) if metric is not None else None
        self.scores, self.distance = scores, distance
        self.register_buffer("thresholds", torch.full((len(scores),), float("inf")))
        self.calibration: Calibration | None = None

    # -- scoring ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.reconstructor.num_classes

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.thresholds).all())

    def check_input(self, x: object, y: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate ``x [B, C, S, S]`` (float in ``[0, 1]``, ``C`` = the cGAN's channels, square,
        ``S ≥`` :data:`MIN_SIDE`) and ``y [B]`` (int64 in ``[0, num_classes)``); ``x`` is returned
        in the cGAN's dtype (float64 / float16 inputs are cast, values unchanged up to rounding)."""
        x = self.validate_images(x)
        check_labels(y, x.shape[0], self.num_classes)
        return x, y

    def validate_images(self, x: object, name: str = "x") -> torch.Tensor:
        """The image part of :meth:`check_input`."""
        check_images(x, channels=self.reconstructor.in_channels, square=True, min_size=MIN_SIDE, name=name)
        return match_dtype(x, self.reconstructor)

    def _prepare(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.check_input(x, y)
        side = self.reconstructor.image_size
        if x.shape[-1] != side or x.shape[-2] != side:
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x

    def score_components(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every configured score ``[B]`` of ``(x, y)`` (≥ 0; larger = more contradictory)."""
        runner_ups = self.runner_up_labels(x, y) if self.contrast_labels > 1 else None
        x = self._prepare(x, y)
        if runner_ups is None:
            return image_scores(x, self.reconstructor(x, y), self.scores, self.metric, self.distance)
        latent = self.reconstructor.encoder(x)[0]
        x_rec = self.reconstructor.generator(latent, y)
        out = image_scores(x, x_rec, [s for s in self.scores if s != "metric"])
        e_x = self.metric(x)
        d_y = embedding_distance(e_x, self.metric(x_rec), self.distance)
        d_others = torch.stack([embedding_distance(e_x, self.metric(self.reconstructor.generator(latent, runner_ups[:, j])),
                                                   self.distance) for j in range(runner_ups.shape[1])], 1)
        out["metric"] = d_y + self.contrast_weight * (MAX_EMBEDDING_DISTANCE - d_others.amin(1))
        return {s: out[s] for s in self.scores}

    @torch.no_grad()
    def runner_up_labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B, k − 1]`` int64: the bound classifier's most likely labels other than ``y``, most likely
        first (``k`` = ``contrast_labels``).  ``x`` at the classifier's size, in ``[0, 1]``."""
        if not self._classifier:
            raise RuntimeError("ContraNet with contrast_labels > 1 needs the classifier's ranking: bind(classifier) "
                               "first (MixDefense and DetectorLayer.load(path, classifier) do it)")
        logits = self._logits(x).detach().float().clone()
        logits.scatter_(1, y.view(-1, 1).to(logits.device), float("-inf"))
        return logits.topk(self.contrast_labels - 1, dim=1).indices.to(y.device)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B]``: the score (one distance), or ``max_k s_k / t_k`` for an OR of several."""
        return self.combine(self.score_components(x, y))

    def decide(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``BoolTensor[B]``: some score above its threshold."""
        if not self.calibrated:
            raise RuntimeError("ContraNet is not calibrated: call calibrate() or load a calibrated bundle")
        t = self.thresholds.to(next(iter(parts.values())).device)
        return torch.stack([parts[s] > t[i] for i, s in enumerate(self.scores)], 1).any(1)

    def margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``max_k s_k / t_k`` ``[B]``: ``> 1`` exactly where the input is rejected (composes with
        other layers' margins)."""
        return self._ratios(self.score_components(x, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``BoolTensor[B]``, ``True`` = rejected as adversarial (``y``: the predicted labels)."""
        return self.decide(self.score_components(x, y))

    @torch.no_grad()
    def detect(self, x: torch.Tensor, classifier: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rejected [B], score [B], predicted labels [B])`` with the classifier's labels."""
        x = self.validate_images(x)
        y_pred = predicted_labels(classifier, x)
        if self.contrast_labels > 1 and not self._classifier:
            self.bind(classifier)  # the runner-up labels come from the same classifier
        parts = self.score_components(x, y_pred)
        return self.decide(parts), self.combine(parts), y_pred

    def combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """One score per image from the components ``{name: [B]}``: raw, or ``max_k s_k / t_k`` for an OR."""
        return parts[self.scores[0]] if len(self.scores) == 1 else self._ratios(parts)

    def _ratios(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``max_k s_k / t_k`` ``[B]`` (needs the thresholds)."""
        if not self.calibrated:
            raise RuntimeError("ContraNet is not calibrated: call calibrate() or load a calibrated bundle")
        t = self.thresholds.to(next(iter(parts.values())).device).clamp_min(1e-12)
        return torch.stack([parts[s] / t[i] for i, s in enumerate(self.scores)], 1).amax(1)

    # -- calibration --------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, y: torch.Tensor, target_frr: float = 0.05, batch_size: int = 250,
                  rejected: torch.Tensor | None = None) -> Calibration:
        """Set the thresholds from clean images ``x`` with labels ``y`` (use the predicted ones; the
        protocol passes only correctly classified images, :func:`mixdefense.calibration.calibrate_composite`).

        The combined detector rejects at most ``target_frr`` of ``x``; see the module docstring.
        ``rejected [N]``: images an earlier layer already rejects (they count against the budget).
        """
        self.check_input(x, y)
        return self.calibrate_from_table(self.score_table(x, y, batch_size), target_frr, rejected)

    def calibrate_from_table(self, parts: dict[str, torch.Tensor], target_frr: float = 0.05,
                             rejected: torch.Tensor | None = None) -> Calibration:
        """Set the thresholds from precomputed clean scores ``{name: [N]}`` (every configured score);
        ``rejected [N]`` as in :meth:`calibrate`."""
        missing = [s for s in self.scores if s not in parts]
        if missing:
            raise ValueError(f"calibration scores missing: {missing}")
        table = torch.stack([parts[s].detach().cpu() for s in self.scores], 1)
        thresholds, q = or_calibrate(table, target_frr, rejected=rejected)
        self.thresholds.copy_(thresholds.to(self.thresholds.device))
        per = (table > thresholds).double().mean(0)
        self.calibration = Calibration(list(self.scores), thresholds.tolist(), target_frr,
                                       float((table > thresholds).any(1).double().mean()), per.tolist(), q, table.shape[0])
        return self.calibration

    @torch.no_grad()
    def score_table(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> dict[str, torch.Tensor]:
        """Every configured score of ``(x, y)`` in batches, on the CPU: ``{name: [N]}``."""
        chunks = [self.score_components(xb, yb) for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
        return {s: torch.cat([c[s].cpu() for c in chunks]) for s in self.scores}

    # -- files ------------------------------------------------------------------------------
    def payload(self) -> dict:
        """The detector as plain tensors and settings (what its file and detector bundles store)."""
        return {
            "scores": list(self.scores),
            "distance": self.distance,
            "contrast_labels": self.contrast_labels,
            "contrast_weight": self.contrast_weight,
            "thresholds": self.thresholds.cpu(),
            "calibration": self.calibration.as_dict() if self.calibration else None,
            "cgan": configured_payload(self.reconstructor),
            "metric": configured_payload(self.metric) if self.metric is not None else None,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> ContraNet:
        """Rebuild a calibrated :class:`ContraNet` from :meth:`payload`'s dict."""
        rec = build_configured(Reconstructor, payload["cgan"])
        metric = build_configured(EmbeddingNet, payload["metric"]) if payload.get("metric") else None
        model = cls(rec, metric, payload["scores"], payload["distance"],
                    int(payload.get("contrast_labels", 1)), float(payload.get("contrast_weight", 0.5)))
        model.thresholds.copy_(payload["thresholds"])
        if payload.get("calibration"):
            model.calibration = Calibration(**payload["calibration"])
        return model.eval()

    def extra_repr(self) -> str:
        contrast = (f", contrast_labels={self.contrast_labels}, contrast_weight={self.contrast_weight}"
                    if self.contrast_labels > 1 else "")
        return f"scores={self.scores}, distance={self.distance!r}{contrast}, thresholds={self.thresholds.tolist()}"


@torch.no_grad()
def predicted_labels(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's labels ``[B]`` (int64, detached: no gradient path into ContraNet)."""
    was_training = classifier.training
    classifier.eval()
    y = classifier(x).argmax(1)
    classifier.train(was_training)
    return y

"""Feature Squeezing (Xu, Evans, Qi, NDSS 2018), a baseline detector with MixDefense's layer interface.

The classifier's softmax on ``x`` is compared with its softmax on *squeezed* copies of ``x``;
an AE's prediction usually moves much more under squeezing than a clean image's:

``score(x) = max_k ‖softmax(f(x)) − softmax(f(squeeze_k(x)))‖₁``  (in ``[0, 2]``)

and ``x`` is rejected when the score exceeds a threshold set on clean validation images at a
target false-rejection rate (default 5 %).

Squeezers (names as in :data:`SQUEEZERS`; images ``[B, C, H, W]`` in ``[0, 1]``):

* ``bits:<n>`` — bit-depth reduction to ``n`` bits: ``round(x·(2ⁿ − 1)) / (2ⁿ − 1)``
  (the paper: 1 bit for MNIST, 5 bits for CIFAR-10);
* ``median:<k>`` — ``k×k`` median smoothing per channel (the paper: 2×2 for MNIST and CIFAR-10).
  For even ``k`` the window spans offsets ``−k/2 … k/2 − 1`` and the upper median is
  taken, borders are mirrored half-sample (all as SciPy's ``median_filter``, mode ``reflect``,
  which Xu et al. used).

The paper's third squeezer for colour images, non-local means, has no PyTorch implementation
here and is left out (say so when you compare).

The detector is a *post-classifier* layer (``kind = "post"``; it ignores the label it is
given) that needs the classifier's softmax: :class:`~mixdefense.pipeline.MixDefense` binds
its classifier to it (:meth:`FeatureSqueezing.bind`).  The classifier is *not* a submodule
(it is the pipeline's), so the layer's ``state_dict`` holds only the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixdefense.classifiers import UsesClassifier
from mixdefense.layers.base import DetectorLayer, register_layer
from mixdefense.validation import check_images

SQUEEZERS = ("bits", "median")


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` in ``[0, 1]`` quantised to ``bits`` bits (``2**bits`` levels), same shape."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _symmetric_pad(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding along ``dim`` (``d c b a | a b c d | d c b a``; SciPy's ``reflect``)."""
    parts = [x.narrow(dim, 0, before).flip(dim)] if before else []
    parts.append(x)
    if after:
        parts.append(x.narrow(dim, x.shape[dim] - after, after).flip(dim))
    return torch.cat(parts, dim)


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k×k`` median smoothing per channel of ``x [B, C, H, W]`` (SciPy's ``median_filter(size=k)``)."""
    if k < 2:
        raise ValueError(f"median window must be >= 2, got {k}")
    b, c, h, w = x.shape
    before, after = k // 2, k - 1 - k // 2  # window offsets -k//2 … k-1-k//2 (SciPy's origin 0)
    if max(before, after) > min(h, w):
        raise ValueError(f"median window {k} is larger than the {h}x{w} image")
    padded = _symmetric_pad(_symmetric_pad(x, before, after, 2), before, after, 3)
    patches = F.unfold(padded, k).view(b, c, k * k, h * w)
    return patches.sort(dim=2).values[:, :, (k * k) // 2].view(b, c, h, w)


def parse_squeezer(spec: str) -> tuple[str, int]:
    """``"bits:1"`` → ``("bits", 1)``; clear error on anything else."""
    name, _, arg = spec.partition(":")
    if name not in SQUEEZERS or not arg.isdigit():
        raise ValueError(f"squeezer {spec!r}: expected one of 'bits:<n>' or 'median:<k>' (e.g. 'bits:1', 'median:2')")
    return name, int(arg)


def squeeze(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply the squeezer named by ``spec`` (see :func:`parse_squeezer`) to ``x``."""
    name, arg = parse_squeezer(spec)
    return bit_depth(x, arg) if name == "bits" else median_filter(x, arg)


@dataclass
class SqueezeCalibration:
    """How the threshold was set: on ``num_images`` clean images at ``target_frr``."""

    threshold: float
    target_frr: float
    achieved_frr: float
    num_images: int

    def as_dict(self) -> dict:
        return asdict(self)


@register_layer
class FeatureSqueezing(UsesClassifier, DetectorLayer):
    """The Feature Squeezing detector (see the module docstring).

    Args:
        squeezers: squeezer specs, e.g. ``("bits:1", "median:2")`` (MNIST) or
            ``("bits:5", "median:2")`` (colour images).
        classifier: the model whose softmax is compared (or bind it later with :meth:`bind`).
    """

    type_name = "feature_squeezing"
    file_format = "mixdefense.feature_squeezing/1"
    kind = "post"

    def __init__(self, squeezers: Sequence[str] = ("bits:1", "median:2"), classifier: nn.Module | None = None):
        super().__init__()
        if not squeezers:
            raise ValueError("Feature Squeezing needs at least one squeezer")
        for s in squeezers:
            parse_squeezer(s)
        self.squeezers = list(squeezers)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.calibration: SqueezeCalibration | None = None
        self._classifier: list[nn.Module] = []  # see UsesClassifier
        if classifier is not None:
            self.bind(classifier)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def _score(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The score of ``x`` given the classifier's ``logits`` on it (one forward per squeezer)."""
        p = F.softmax(logits, dim=1)
        return torch.stack([(p - F.softmax(self._logits(squeeze(x, s)), 1)).abs().sum(1) for s in self.squeezers], 1).amax(1)

    def score(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` max L1 distance between the softmax of ``x`` and of each squeezed ``x`` (``y`` unused)."""
        check_images(x)
        return self._score(x, self._logits(x))

    def _check_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError("FeatureSqueezing is not calibrated: call calibrate() or load a calibrated file")

    def margin(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``score / threshold`` ``[B]``: ``> 1`` exactly where the input is rejected."""
        self._check_calibrated()
        return self.score(x) / self.threshold.clamp_min(1e-12)

    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the classifier's labels [B], margins [B])``, sharing the classifier's forward on ``x``."""
        self._check_calibrated()
        check_images(x)
        logits = self._logits(x)
        return logits.argmax(1), self._score(x, logits) / self.threshold.clamp_min(1e-12)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, target_frr: float = 0.05, batch_size: int = 500) -> SqueezeCalibration:
        """Threshold = the ``1 − target_frr`` quantile of the clean scores of ``x`` (clean rejection ≤ target)."""
        if not 0.0 <= target_frr < 1.0:
            raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
        scores = torch.cat([self.score(xb).cpu() for xb in x.split(batch_size)]).double()
        t = torch.quantile(scores, 1.0 - target_frr, interpolation="higher")
        self.threshold.fill_(float(t))
        self.calibration = SqueezeCalibration(float(t), target_frr, float((scores > t).double().mean()), len(scores))
        return self.calibration

    def payload(self) -> dict:
        """Settings and threshold as plain values (what its file and detector bundles store)."""
        return {"squeezers": list(self.squeezers), "threshold": self.threshold.cpu(),
                "calibration": self.calibration.as_dict() if self.calibration else None}

    @classmethod
    def from_payload(cls, payload: dict) -> FeatureSqueezing:
        """Rebuild a calibrated (unbound) layer from :meth:`payload`'s dict."""
        layer = cls(payload["squeezers"])
        layer.threshold.copy_(payload["threshold"])
        if payload.get("calibration"):
            layer.calibration = SqueezeCalibration(**payload["calibration"])
        return layer.eval()

    def extra_repr(self) -> str:
        return f"squeezers={self.squeezers}, threshold={float(self.threshold):.4g}"

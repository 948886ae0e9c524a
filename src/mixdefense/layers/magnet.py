"""MagNet (Meng & Chen, CCS 2017), a baseline defense with MixDefense's layer interface.

An autoencoder ``AE`` trained on clean images only (with Gaussian noise on its input, σ = 0.1)
learns the manifold of clean data.  Then:

* **detectors** — an input far from the manifold is rejected:
  ``l1`` / ``l2``: reconstruction error ``mean |x − AE(x)|^p`` over all C·H·W values (p = 1, 2);
  ``jsd:<T>``: the Jensen–Shannon divergence between the classifier's softmax at temperature
  ``T`` on ``x`` and on ``AE(x)`` (the paper: T = 10 and 40);
* **reformer** — the classifier labels ``AE(x)`` instead of ``x`` (:meth:`MagNet.reform`),
  which pulls small perturbations back toward the manifold.

The detectors are OR-combined; their thresholds come from clean validation images so that the
*combined* clean false rejection stays ≤ the target (each detector cut at the same per-score
quantile: :func:`mixdefense.layers.thresholds.or_calibrate`, the same rule as ContraNet's OR).

Like :class:`~mixdefense.layers.squeezing.FeatureSqueezing`, the layer is ``kind = "post"`` (the
``jsd`` detectors need the classifier; the label it is given is ignored) and the pipeline binds
its classifier to it; the autoencoder is its own submodule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixdefense.classifiers import UsesClassifier
from mixdefense.io import build_configured, configured_payload, load_tagged, save_configured
from mixdefense.layers.base import DetectorLayer, register_layer
from mixdefense.layers.thresholds import or_calibrate
from mixdefense.validation import check_images

AUTOENCODER_FORMAT = "mixdefense.magnet_autoencoder/1"


class MagNetAutoencoder(nn.Module):
    """MagNet's convolutional autoencoder: ``[B, C, H, W]`` in ``[0, 1]`` → same shape in ``[0, 1]``.

    ``hidden`` 3×3 convolutions with sigmoids; with ``pool`` an average pooling after the first
    and a nearest upsampling before the last (MNIST's "detector I" structure: ``hidden=(3, 3)``,
    ``pool=True``; CIFAR-10's: ``hidden=(3,)``, ``pool=False``).  H and W must be even with ``pool``.
    """

    def __init__(self, in_channels: int = 1, hidden: Sequence[int] = (3, 3), pool: bool = True):
        super().__init__()
        hidden = list(hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive channel counts, got {hidden}")
        self.config = {"in_channels": int(in_channels), "hidden": hidden, "pool": bool(pool)}
        enc: list[nn.Module] = []
        cin = in_channels
        for i, h in enumerate(hidden):
            enc += [nn.Conv2d(cin, h, 3, padding=1), nn.Sigmoid()]
            if i == 0 and pool:
                enc.append(nn.AvgPool2d(2))
            cin = h
        dec: list[nn.Module] = []
        for h in reversed(hidden[:-1]):
            dec += [nn.Conv2d(cin, h, 3, padding=1), nn.Sigmoid()]
            cin = h
        if pool:
            dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
        dec += [nn.Conv2d(cin, in_channels, 3, padding=1), nn.Sigmoid()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def save_autoencoder(model: MagNetAutoencoder, path, **record) -> None:
    save_configured(model, path, AUTOENCODER_FORMAT, **record)


def load_autoencoder(path, map_location="cpu") -> MagNetAutoencoder:
    return build_configured(MagNetAutoencoder, load_tagged(path, AUTOENCODER_FORMAT, "MagNet autoencoder", map_location))


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``JSD(p ‖ q)`` ``[B]`` of probability rows ``[B, K]`` (natural log; in ``[0, ln 2]``)."""
    m = 0.5 * (p + q)
    kl = lambda a: (a * (a.clamp_min(1e-12).log() - m.clamp_min(1e-12).log())).sum(1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def parse_detector(spec: str) -> tuple[str, float]:
    """``"l1"`` → ``("l1", 1)``, ``"jsd:10"`` → ``("jsd", 10.0)``; clear error otherwise."""
    name, _, arg = spec.partition(":")
    if name in ("l1", "l2") and not arg:
        return name, float(name[1])
    if name == "jsd":
        try:
            t = float(arg)
        except ValueError:
            t = -1.0
        if t > 0:
            return name, t
    raise ValueError(f"MagNet detector {spec!r}: expected 'l1', 'l2' or 'jsd:<temperature>' (e.g. 'jsd:10')")


@dataclass
class MagNetCalibration:
    detectors: list[str]
    thresholds: list[float]
    target_frr: float
    achieved_frr: float
    per_detector_frr: list[float]
    num_images: int

    def as_dict(self) -> dict:
        return asdict(self)


@register_layer
class MagNet(UsesClassifier, DetectorLayer):
    """MagNet's detectors and reformer around a trained autoencoder (see the module docstring)."""

    type_name = "magnet"
    file_format = "mixdefense.magnet/1"
    kind = "post"

    def __init__(self, autoencoder: MagNetAutoencoder, detectors: Sequence[str] = ("l1", "jsd:10", "jsd:40"),
                 classifier: nn.Module | None = None):
        super().__init__()
        if not detectors:
            raise ValueError("MagNet needs at least one detector")
        for d in detectors:
            parse_detector(d)
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.detectors = list(detectors)
        self.register_buffer("thresholds", torch.full((len(detectors),), float("nan")))
        self.calibration: MagNetCalibration | None = None
        self._classifier: list[nn.Module] = []  # see UsesClassifier
        if classifier is not None:
            self.bind(classifier)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.thresholds).all())

    def reform(self, x: torch.Tensor) -> torch.Tensor:
        """The reformer: ``AE(x)``, same shape, in ``[0, 1]``."""
        check_images(x, channels=self.autoencoder.config["in_channels"])
        return self.autoencoder(x)

    def _scores(self, x: torch.Tensor, need_rec_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(scores [B, D], the classifier's logits on AE(x) or None)``: one AE pass, each logit pass at most once."""
        rec = self.reform(x)
        logits = None
        logits_rec = self._logits(rec) if need_rec_logits else None
        out = []
        for spec in self.detectors:
            name, arg = parse_detector(spec)
            if name in ("l1", "l2"):
                out.append((x - rec).abs().pow(arg).flatten(1).mean(1))
                continue
            if logits is None:
                logits = self._logits(x)
                logits_rec = self._logits(rec) if logits_rec is None else logits_rec
            out.append(jensen_shannon(F.softmax(logits / arg, 1), F.softmax(logits_rec / arg, 1)))
        return torch.stack(out, 1), logits_rec

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]``: every detector's score (larger = more adversarial)."""
        return self._scores(x)[0]

    def _check_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError("MagNet is not calibrated: call calibrate() or load a calibrated file")

    def margin(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``max_d s_d / t_d`` ``[B]``: ``> 1`` exactly where some detector rejects (``y`` unused)."""
        self._check_calibrated()
        return (self.scores(x) / self.thresholds.clamp_min(1e-12)).amax(1)

    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the classifier's labels on the reformed AE(x) [B], margins [B])``, sharing the AE and classifier passes."""
        self._check_calibrated()
        scores, logits_rec = self._scores(x, need_rec_logits=True)
        return logits_rec.argmax(1), (scores / self.thresholds.clamp_min(1e-12)).amax(1)

    @torch.no_grad()
    def reformed_labels(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's labels ``[B]`` on the reformed inputs ``AE(x)``."""
        return self._logits(self.reform(x)).argmax(1)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, target_frr: float = 0.05, batch_size: int = 500) -> MagNetCalibration:
        """Thresholds from clean images ``x`` so the OR of the detectors rejects ≤ ``target_frr`` of them."""
        table = torch.cat([self.scores(xb).cpu() for xb in x.split(batch_size)])
        thresholds, _ = or_calibrate(table, target_frr)
        self.thresholds.copy_(thresholds.to(self.thresholds.device))
        rej = table > thresholds
        self.calibration = MagNetCalibration(list(self.detectors), thresholds.tolist(), target_frr,
                                             float(rej.any(1).double().mean()), rej.double().mean(0).tolist(), len(table))
        return self.calibration

    def payload(self) -> dict:
        """The autoencoder, detectors and thresholds as plain values (its file and detector bundles)."""
        return {"autoencoder": configured_payload(self.autoencoder), "detectors": list(self.detectors),
                "thresholds": self.thresholds.cpu(),
                "calibration": self.calibration.as_dict() if self.calibration else None}

    @classmethod
    def from_payload(cls, payload: dict) -> MagNet:
        """Rebuild a calibrated (unbound) layer from :meth:`payload`'s dict."""
        layer = cls(build_configured(MagNetAutoencoder, payload["autoencoder"]), payload["detectors"])
        layer.thresholds.copy_(payload["thresholds"])
        if payload.get("calibration"):
            layer.calibration = MagNetCalibration(**payload["calibration"])
        return layer.eval()

    def extra_repr(self) -> str:
        return f"detectors={self.detectors}, thresholds={self.thresholds.tolist()}"

"""MixDefense, the composite detector (paper Figure 1): pre-classifier layers, the classifier, post-classifier layers.

Every layer is a :class:`~mixdefense.layers.DetectorLayer` (registered in :mod:`mixdefense.layers`)
with a ``name`` and a ``kind``:

* ``kind = "pre"`` — sees the input only, before the classifier runs: ``layer(x) → rejected [B]``
  (e.g. :class:`~mixdefense.layers.saec.SAEC`);
* ``kind = "post"`` — sees the input and the classifier's predicted label:
  ``layer(x, y_pred) → rejected [B]`` (e.g. :class:`~mixdefense.layers.contranet.ContraNet`).

:class:`MixDefense` runs the pre layers in order, then the classifier on the inputs still
accepted, then the post layers in order; an input rejected by a layer is never shown to
the later ones (an SAEC rejection skips the classifier).  Further detectors (Feature
Squeezing and MagNet — :mod:`mixdefense.layers.squeezing`, :mod:`mixdefense.layers.magnet`; paper §7) slot in
between by their kind; a layer with a ``bind(classifier)`` method is given the pipeline's classifier.  Images are
``[B, C, H, W]`` floats in ``[0, 1]`` at the classifier's size; a post layer that works at
another size resizes on its own.

A trained detector is one plain-weights file (:func:`save_bundle` / :func:`load_detector`,
``torch.load(weights_only=True)``): the classifier, every layer's weights, thresholds and
settings.  No Lightning, no config file is needed to use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mixdefense.classifiers import Classifier
from mixdefense.io import (
    atomic_torch_save,
    build_configured,
    configured_payload,
    load_tagged,
    refuses_malformed,
)
from mixdefense.layers import layer_class, type_of
from mixdefense.validation import check_images, match_dtype

BUNDLE_FORMAT = "mixdefense.detector/1"
NOT_CLASSIFIED = -1  # label of an input rejected before the classifier ran
ACCEPTED = -1  # layer index of an accepted input


@dataclass
class Verdict:
    """What :meth:`MixDefense.detect` decided for a batch of ``B`` images.

    ``labels [B]``: the classifier's label (``-1`` where a pre layer rejected the input, so the
    classifier never ran); ``rejected [B]`` bool; ``layer [B]``: index into ``layer_names`` of
    the layer that rejected the input, ``-1`` when accepted.
    """

    labels: torch.Tensor
    rejected: torch.Tensor
    layer: torch.Tensor
    layer_names: list[str]

    def rejected_by(self, name: str) -> torch.Tensor:
        """``[B]`` bool: rejected by the layer called ``name``."""
        if name not in self.layer_names:
            raise KeyError(f"no layer {name!r}; layers: {self.layer_names}")
        return self.layer == self.layer_names.index(name)

    def caught_by(self) -> dict[str, int]:
        """How many inputs each layer rejected (and how many were accepted)."""
        counts = {n: int((self.layer == i).sum()) for i, n in enumerate(self.layer_names)}
        counts["accepted"] = int((~self.rejected).sum())
        return counts


class MixDefense(nn.Module):
    """The composite detector: ``layers`` (pre kinds first, then post kinds) around ``classifier``.

    ``detect(x) → Verdict`` (also ``forward``).  Layer names must be unique.
    """

    def __init__(self, classifier: nn.Module, layers: Sequence[nn.Module]):
        super().__init__()
        kinds = [getattr(layer, "kind", None) for layer in layers]
        if any(k not in ("pre", "post") for k in kinds):
            raise ValueError(f"every layer needs kind 'pre' or 'post', got {kinds}")
        if "post" in kinds and "pre" in kinds[kinds.index("post"):]:
            raise ValueError(f"pre-classifier layers must come before post-classifier ones, got {kinds}")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        classes = getattr(classifier, "num_classes", None)
        for layer in layers:
            k = getattr(layer, "num_classes", None)
            if classes is not None and k is not None and k != classes:
                raise ValueError(f"layer {layer.name!r} knows {k} classes, the classifier {classes}: they belong to different datasets")
        channels = getattr(classifier, "in_channels", None)
        for layer in layers:
            rec = getattr(layer, "reconstructor", None)
            if channels is not None and rec is not None and rec.in_channels != channels:
                raise ValueError(f"layer {layer.name!r} takes {rec.in_channels}-channel images, the classifier {channels}")
        self.classifier = classifier.eval()
        for layer in layers:  # layers that need the classifier's outputs (Feature Squeezing, MagNet) use this one
            if hasattr(layer, "bind"):
                layer.bind(self.classifier)
        self.layers = nn.ModuleList(layers)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> Verdict:
        """Run the pipeline on ``x [B, C, H, W]`` in ``[0, 1]`` (see the module docstring)."""
        x = self.check_input(x)
        b = x.shape[0]
        labels = torch.full((b,), NOT_CLASSIFIED, dtype=torch.long, device=x.device)
        layer = torch.full((b,), ACCEPTED, dtype=torch.long, device=x.device)
        alive = torch.ones(b, dtype=torch.bool, device=x.device)
        classified = False
        for i, det in enumerate(self.layers):
            if det.kind == "post" and not classified:
                labels[alive] = self._classify(x[alive])
                classified = True
            idx = alive.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            rej = det(x[idx]) if det.kind == "pre" else det(x[idx], labels[idx])
            layer[idx[rej]] = i
            alive[idx[rej]] = False
        if not classified:
            labels[alive] = self._classify(x[alive])
        return Verdict(labels, layer != ACCEPTED, layer, self.layer_names)

    @torch.no_grad()
    def layer_table(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer on *every* input, for evaluation: ``(labels [B], margins [L, B])``.

        ``margins[i] > 1`` exactly where layer ``i`` alone rejects the input (each layer's
        ``margin``); the composite's decision is then the first layer in order with a margin
        ``> 1`` — the same verdict as :meth:`detect`, which never runs a later layer on a
        rejected input — and ``margins.amax(0)`` is a single score for ROC curves.
        """
        x = self.check_input(x)
        labels = self._classify(x)
        rows = [det.margin(x) if det.kind == "pre" else det.margin(x, labels) for det in self.layers]
        return labels, torch.stack(rows)

    def verdict_from_table(self, labels: torch.Tensor, margins: torch.Tensor) -> Verdict:
        """The composite's :class:`Verdict` from :meth:`layer_table`: the first rejecting layer wins,
        and an input a pre layer rejected gets label ``-1`` (the classifier never saw it)."""
        rej = margins > 1
        any_rej = rej.any(0)
        first = torch.where(any_rej, rej.int().argmax(0), torch.full_like(labels, ACCEPTED))
        is_pre = torch.tensor([det.kind == "pre" for det in self.layers], device=labels.device)
        by_pre = any_rej & is_pre[first.clamp_min(0)]
        return Verdict(labels.masked_fill(by_pre, NOT_CLASSIFIED), any_rej, first, self.layer_names)

    def check_input(self, x: object) -> torch.Tensor:
        """Validate ``x`` against the classifier (channels, size; float in ``[0, 1]``, finite, non-empty:
        :func:`~mixdefense.validation.check_images`) and cast it to the classifier's dtype."""
        check_images(x, channels=getattr(self.classifier, "in_channels", None),
                     size=getattr(self.classifier, "image_size", None))
        return match_dtype(x, self.classifier)

    def _classify(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=x.device)
        self.classifier.eval()
        return self.classifier(x).argmax(1)

    def forward(self, x: torch.Tensor) -> Verdict:
        return self.detect(x)


def save_bundle(detector: MixDefense, path: str | Path, **record: Any) -> Path:
    """Write the whole detector (classifier, layers, thresholds, settings) as one plain-weights file."""
    if not isinstance(detector.classifier, Classifier):
        raise TypeError("bundles store a mixdefense.classifiers.Classifier (save a custom model's weights yourself)")
    layers = [{"type": type_of(layer), "payload": layer.payload()} for layer in detector.layers]
    clf = detector.classifier
    import mixdefense

    versions = {"mixdefense": str(mixdefense.__version__), "torch": str(torch.__version__)}
    payload = {"format": BUNDLE_FORMAT, "classifier": configured_payload(clf),
               "layers": layers, "versions": versions, "record": record}
    return atomic_torch_save(payload, path)


@refuses_malformed("detector bundle")
def load_detector(path: str | Path, map_location: str | torch.device = "cpu") -> MixDefense:
    """Load :func:`save_bundle`'s file with ``torch.load(weights_only=True)``; a ready :class:`MixDefense`."""
    payload = load_tagged(path, BUNDLE_FORMAT, "detector bundle", map_location)
    clf = build_configured(Classifier, payload["classifier"])
    layers = []
    for entry in payload["layers"]:
        try:
            cls = layer_class(entry["type"])
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        layers.append(cls.from_payload(entry["payload"]))
    detector = MixDefense(clf, layers)
    detector.record = payload.get("record", {})
    detector.versions = payload.get("versions", {})
    return detector.eval()

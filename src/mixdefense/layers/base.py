"""The one base class of MixDefense's detector layers, and their registry.

A *detector layer* is an ``nn.Module`` that looks at images ``x [B, C, H, W]`` (float in
``[0, 1]``) and rejects some of them.  Every layer answers the same questions:

* ``name`` — unique within a pipeline (default: the registered ``type_name``);
* ``kind`` — ``"pre"``: sees ``x`` only, before the classifier runs (SAEC);
  ``"post"``: sees ``x`` and the classifier's predicted label ``y [B]`` (ContraNet,
  Feature Squeezing, MagNet);
* ``score(x[, y]) → [B]`` — the layer's own statistic (its direction is the layer's: SAEC's
  noise level is *smaller* for noisier inputs, the others are larger for adversarial ones);
* ``margin(x[, y]) → [B]`` — ``> 1`` exactly where the layer rejects ``x``: one scale for
  every layer, so margins compose (the pipeline's verdict is the first layer with a margin
  ``> 1``; ``max`` over layers is a single score for ROC curves);
* ``forward(x[, y]) → bool [B]`` — ``True`` = rejected;
* ``calibrate(...)`` — set the threshold(s) from clean data (each layer documents its own
  arguments: SAEC takes clean images and makes uniform-noise copies; the others take clean
  images at a target false-rejection rate);
* ``payload()`` / ``from_payload(d)`` — the layer as plain tensors and settings (what its own
  file and a detector bundle store, loadable with ``torch.load(weights_only=True)``);
  ``save(path)`` / ``load(path)`` — its own file, tagged with ``file_format``.

Adding a detector means: subclass :class:`DetectorLayer`, set ``type_name``, ``file_format`` and
``kind``, implement the methods above, and decorate the class with :func:`register_layer`.
Bundles (:mod:`mixdefense.pipeline`) and the evaluation's compared defenses
(:mod:`mixdefense.evaluation.baselines`) then find it through :data:`LAYERS` — nothing else
needs editing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn as nn

from mixdefense.io import atomic_torch_save, load_plain, load_tagged, refuses_malformed

KINDS = ("pre", "post")

#: registered layer classes by ``type_name`` (the bundles' layer type)
LAYERS: dict[str, type[DetectorLayer]] = {}

L = TypeVar("L", bound="type[DetectorLayer]")


class DetectorLayer(nn.Module):
    """Base class of every detector layer (see the module docstring for the contract)."""

    type_name: ClassVar[str] = ""
    file_format: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    name: str = ""

    # -- what a subclass implements ---------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Whether the threshold(s) are set (``forward`` / ``margin`` raise until they are)."""
        raise NotImplementedError

    def score(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's statistic ``[B]`` (direction: the layer's own; see ``margin``)."""
        raise NotImplementedError

    def margin(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]``, ``> 1`` exactly where the layer rejects the input."""
        raise NotImplementedError

    def calibrate(self, *args: Any, **kwargs: Any) -> Any:
        """Set the threshold(s) from clean data; returns the layer's calibration record."""
        raise NotImplementedError

    def payload(self) -> dict[str, Any]:
        """Settings, weights and thresholds as plain values (``weights_only``-loadable)."""
        raise NotImplementedError

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> DetectorLayer:
        """Rebuild a calibrated layer from :meth:`payload`'s dict."""
        raise NotImplementedError

    # -- shared behaviour ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``BoolTensor[B]``: ``True`` = rejected."""
        return self.margin(x) > 1 if self.kind == "pre" else self.margin(x, y) > 1

    def save(self, path: str | Path, **record: Any) -> Path:
        """Write the layer as one plain-weights file tagged ``file_format`` (``record``: provenance)."""
        return atomic_torch_save({"format": self.file_format, **self.payload(), "record": record}, path)

    @classmethod
    def load(cls, path: str | Path, classifier: nn.Module | None = None, map_location: str | torch.device = "cpu"):
        """Load :meth:`save`'s file (``torch.load(weights_only=True)``); a layer that reads the
        classifier's outputs (``bind``) is bound to ``classifier`` when one is given."""
        layer = _load_checked(cls, path, map_location)
        if classifier is not None and hasattr(layer, "bind"):
            layer.bind(classifier)
        return layer.eval()


def _load_checked(cls: type[DetectorLayer], path, map_location) -> DetectorLayer:
    """``cls.from_payload`` of the file; a payload with the right tag but the wrong structure is one
    ``ValueError`` naming the file (:func:`~mixdefense.io.refuses_malformed`)."""
    return refuses_malformed(cls.__name__)(_from_file)(path, cls, map_location)


def _from_file(path, cls: type[DetectorLayer], map_location) -> DetectorLayer:
    return cls.from_payload(load_tagged(path, cls.file_format, cls.__name__, map_location))


def register_layer(cls: L) -> L:
    """Class decorator: make ``cls`` known to bundles and evaluations under ``cls.type_name``."""
    if not (isinstance(cls, type) and issubclass(cls, DetectorLayer)):
        raise TypeError(f"register_layer takes a DetectorLayer subclass, got {cls!r}")
    if not cls.type_name or not cls.file_format:
        raise ValueError(f"{cls.__name__} needs a type_name and a file_format")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    known = LAYERS.get(cls.type_name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"layer type {cls.type_name!r} is already registered by {known.__module__}.{known.__qualname__}")
    if any(c.file_format == cls.file_format and c.type_name != cls.type_name for c in LAYERS.values()):
        raise ValueError(f"file format {cls.file_format!r} is already registered")
    if not cls.name:
        cls.name = cls.type_name
    LAYERS[cls.type_name] = cls
    return cls


def layer_class(type_name: str) -> type[DetectorLayer]:
    """The registered class of ``type_name`` (a clear error naming the known ones otherwise)."""
    _register_builtin()
    if type_name not in LAYERS:
        raise ValueError(f"unknown layer type {type_name!r}; registered: {sorted(LAYERS)}")
    return LAYERS[type_name]


def type_of(layer: nn.Module) -> str:
    """The registered ``type_name`` of a layer instance (``TypeError`` for an unregistered one)."""
    _register_builtin()
    for type_name, cls in LAYERS.items():
        if type(layer) is cls:
            return type_name
    for type_name, cls in LAYERS.items():
        if isinstance(layer, cls):
            return type_name
    raise TypeError(f"{type(layer).__name__} is not a registered detector layer (known: {sorted(LAYERS)}); "
                    "subclass mixdefense.layers.DetectorLayer and decorate it with @register_layer")


def format_of(path: str | Path, what: str = "layer") -> str | None:
    """The ``format`` tag stored in a plain-weights file (``None`` when it has none)."""
    payload = load_plain(path, what)
    return payload.get("format") if isinstance(payload, dict) else None


def class_for_format(tag: str | None) -> type[DetectorLayer] | None:
    """The registered layer class whose files carry ``tag`` (``None`` when no layer does)."""
    _register_builtin()
    return next((cls for cls in LAYERS.values() if cls.file_format == tag), None)


def _register_builtin() -> None:
    """Import the built-in layers (they register themselves) before the registry is read."""
    import mixdefense.layers  # noqa: F401

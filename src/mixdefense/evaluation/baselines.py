"""Baseline defenses on MixDefense's evaluation curves (paper §5.1 "compared defense methods").

A *compared defense* answers, for a batch of images ``x [B, C, H, W]`` in ``[0, 1]``,
``labels_and_margins(x) → (labels [B] int64, margins [B] float)``: the label the defended
system outputs and a margin that is ``> 1`` exactly where the defense rejects the input
(0 where it never rejects).  Three kinds:

* :class:`DetectorBaseline` — a detector layer in front of the *same* classifier as
  MixDefense (Feature Squeezing, MagNet, or any layer registered in :mod:`mixdefense.layers`).  It is evaluated on the *same AEs* as MixDefense
  (made against that classifier).  MagNet's label is the classifier's label on the reformed
  input (``reform``); Feature Squeezing's is the classifier's own.
* :class:`RobustClassifier` — a classifier trained to resist attacks (Madry PGD adversarial
  training); it never rejects.  Transferred AEs would flatter it, so the evaluation attacks
  *it* (white-box) with the same attacks, budgets and test images, and reports Acc_RC.
* :class:`BundleBaseline` — another MixDefense bundle around the *same* classifier (a detector
  variant, e.g. the ``paper`` one beside MixDefense+): evaluated on the same AEs, its margin the
  largest of its layers' margins.
* the undefended classifier itself (no object needed: the evaluation's base rows).

:func:`load_baseline` builds one from a file by its format tag (``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mixdefense.classifiers import CLASSIFIER_FORMAT, load_classifier
from mixdefense.layers.base import class_for_format, format_of
from mixdefense.pipeline import BUNDLE_FORMAT, MixDefense, load_detector


class DetectorBaseline:
    """A detector layer in front of ``classifier``; the layer gives ``labels_and_margins(x)`` (its
    output label — MagNet's on the reformed input — and its margin)."""

    attack_model = None  # evaluated on the AEs made against MixDefense's classifier

    def __init__(self, name: str, layer: nn.Module, classifier: nn.Module):
        self.name, self.layer, self.classifier = name, layer, classifier
        if hasattr(layer, "bind"):
            layer.bind(classifier)

    @torch.no_grad()
    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels [B], margins [B])``: the layer's own ``labels_and_margins`` where it has one (it
        shares the classifier/autoencoder passes; MagNet labels the reformed input), else the
        classifier's labels and the layer's margin (``> 1``: rejected)."""
        if hasattr(self.layer, "labels_and_margins"):
            return self.layer.labels_and_margins(x)
        self.classifier.eval()
        labels = self.classifier(x).argmax(1)
        return labels, self.layer.margin(x) if self.layer.kind == "pre" else self.layer.margin(x, labels)


class BundleBaseline:
    """A whole detector bundle (another variant of MixDefense) around the evaluated bundle's classifier.

    The AEs are made against that classifier, so the variant must hold the *same* weights
    (checked): both variants then judge the very same inputs.  ``labels_and_margins(x)`` gives the
    classifier's labels and ``max`` over the variant's layers of each layer's margin (``> 1``: some
    layer rejects, the composite's verdict); the evaluation recuts that one score at each rate on
    the same calibration images as every other detector (at the variant's own operating point the
    cut is about 1).
    """

    attack_model = None  # evaluated on the AEs made against MixDefense's classifier

    def __init__(self, name: str, detector: MixDefense, classifier: nn.Module):
        mine, theirs = detector.classifier.state_dict(), classifier.state_dict()
        same = mine.keys() == theirs.keys() and all(
            mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)
        if not same:
            raise ValueError(f"baseline {name!r}: the bundle's classifier differs from the evaluated detector's "
                             "(a variant must wrap the same classifier, whose AEs both judge)")
        self.name, self.detector = name, detector.eval()

    @torch.no_grad()
    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.detector.to(x.device)
        labels, margins = self.detector.layer_table(x)
        return labels, margins.amax(0)


class RobustClassifier:
    """A robust classifier (e.g. Madry PGD-AT) that never rejects; attacked white-box (``attack_model``)."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model = name, model.eval()

    @property
    def attack_model(self) -> nn.Module:
        return self.model

    @torch.no_grad()
    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        return self.model(x).argmax(1), torch.zeros(x.shape[0], device=x.device)


def load_baseline(name: str, path: str | Path,
                  classifier: nn.Module) -> DetectorBaseline | BundleBaseline | RobustClassifier:
    """The compared defense stored in ``path``: a Feature Squeezing or MagNet file (in front of
    ``classifier``), a detector bundle around the same ``classifier`` (another variant), or a
    classifier file (a robust classifier such as ``madry.pt``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"baseline {name!r}: {path} not found (make train-madry / train-magnet / baselines DATASET=...)")
    tag = format_of(path, f"baseline {name!r}")
    layer_cls = class_for_format(tag)
    if layer_cls is not None:
        return DetectorBaseline(name, layer_cls.load(path), classifier)
    if tag == BUNDLE_FORMAT:
        return BundleBaseline(name, load_detector(path), classifier)
    if tag != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a baseline file (format {tag!r}; expected a registered detector layer's file "
                         "or a classifier)")
    model = load_classifier(path)
    for attr in ("num_classes", "in_channels", "image_size"):
        mine, theirs = getattr(model, attr, None), getattr(classifier, attr, None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"baseline {name!r}: {path} has {attr}={mine}, the detector's classifier {theirs}")
    return RobustClassifier(name, model)

"""MixDefense's detector layers, one base class and a registry (:mod:`.base`).

Built in: :class:`SAEC` (pre-classifier, the paper's LP layer), :class:`ContraNet`
(post-classifier, the SP layer), and the baselines :class:`FeatureSqueezing` and
:class:`MagNet` (post-classifier).  A new layer subclasses :class:`DetectorLayer` and is
decorated with :func:`register_layer`; see ``docs/extending.md``.
"""

from mixdefense.layers.base import (
           LAYERS,
           DetectorLayer,
           class_for_format,
           layer_class,
           register_layer,
           type_of,
)
from mixdefense.layers.contranet import ContraNet
from mixdefense.layers.magnet import MagNet
from mixdefense.layers.saec import SAEC
from mixdefense.layers.squeezing import FeatureSqueezing

__all__ = ["LAYERS", "SAEC", "ContraNet", "DetectorLayer", "FeatureSqueezing", "MagNet", "class_for_format",
           "layer_class", "register_layer", "type_of"]

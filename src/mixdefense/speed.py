"""Inference speed settings for a trained detector: bf16, channels-last memory and ``torch.compile``.

A *variant* is ``"fp32"`` (nothing changed) or a ``+``-joined set of transforms (:data:`TRANSFORMS`), applied to the
*networks* of a detector (the classifier, ContraNet's reconstructor and metric net, MagNet's autoencoder) in place;
the statistical parts (SAEC, the squeezers, scores and thresholds) always stay float32:

* ``channels_last`` — networks in channels-last memory format (the same float32 arithmetic, reordered);
* ``bf16`` — every network's forward under ``torch.autocast(device, torch.bfloat16)``, outputs cast back to float32;
* ``bf16_layers`` — the same autocast on the detector layers' networks only: the classifier, and so the label,
  stays float32;
* ``compile`` — ``nn.Module.compile()`` (``torch.compile``, default mode) of each network.

Whether a variant may be used is measured, not assumed: ``benchmarks/throughput.py`` counts a variant as usable
where its verdicts (accept/reject and label) equal float32's on ≥ 99.9 % of the test images
(``benchmarks/results/throughput_<ds>.md``); ``mixdefense detect --speed VARIANT`` applies one.

    >>> from mixdefense.pipeline import load_detector
    >>> from mixdefense.speed import accelerate
    >>> detector = accelerate(load_detector("artifacts/gtsrb/detector.pt"), "channels_last")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

#: the transforms a variant combines ("+"), applied in this order
TRANSFORMS = ("channels_last", "bf16", "bf16_layers", "compile")


def parse_variant(name: str) -> tuple[str, ...]:
    """``"fp32"`` → ``()``, ``"bf16+channels_last"`` → ``("channels_last", "bf16")`` (in :data:`TRANSFORMS` order).

    Raises ``ValueError`` for an unknown or repeated name, or for ``bf16`` with ``bf16_layers`` (one or the other)."""
    parts = [p for p in name.split("+") if p]
    if parts == ["fp32"]:
        return ()
    unknown = [p for p in parts if p not in TRANSFORMS]
    if not parts or unknown or len(set(parts)) != len(parts) or {"bf16", "bf16_layers"} <= set(parts):
        raise ValueError(f"variant {name!r}: expected 'fp32' or '+'-joined distinct names from {TRANSFORMS} "
                         "(bf16 or bf16_layers, not both)")
    return tuple(t for t in TRANSFORMS if t in parts)


def _float_outputs(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_float_outputs(o) for o in out)
    if isinstance(out, dict):
        return {k: _float_outputs(v) for k, v in out.items()}
    return out


def autocast_bf16(module: nn.Module) -> nn.Module:
    """Run ``module``'s forward under bf16 autocast on its parameters' device type, its floating outputs cast back to
    float32 (in place; returns ``module``)."""
    forward = module.forward
    param = next(module.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"

    def bf16_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return _float_outputs(out)

    module.forward = bf16_forward
    return module


def apply_variant(nets: Sequence[nn.Module], transforms: Sequence[str],
                  layer_nets: Sequence[nn.Module] = ()) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply ``transforms`` to the networks in place; returns the matching input transform.

    ``nets`` are every network of a decision path, ``layer_nets`` those of them that belong to the detector layers
    (not the classifier): ``bf16`` autocasts all of ``nets``, ``bf16_layers`` only the ``layer_nets``."""
    layer_ids = {id(n) for n in layer_nets}
    if layer_ids - {id(n) for n in nets}:
        raise ValueError("layer_nets must be among nets")
    for net in nets:
        if "channels_last" in transforms:
            net.to(memory_format=torch.channels_last)
        if "bf16" in transforms or ("bf16_layers" in transforms and id(net) in layer_ids):
            autocast_bf16(net)
        if "compile" in transforms:
            net.compile()
    if "channels_last" in transforms:
        return lambda x: x.contiguous(memory_format=torch.channels_last)
    return lambda x: x


def layer_networks(layer: nn.Module) -> list[nn.Module]:
    """The networks a detector layer owns: its direct children with parameters (ContraNet's reconstructor and
    metric net, MagNet's autoencoder; none for SAEC and Feature Squeezing)."""
    return [m for _, m in layer.named_children() if any(True for _ in m.parameters())]


def accelerate(detector: nn.Module, variant: str) -> nn.Module:
    """Apply ``variant`` (see the module docstring) to a :class:`~mixdefense.pipeline.MixDefense`'s networks in place
    and return it; its ``detect`` keeps the same interface (float32 inputs and verdicts)."""
    transforms = parse_variant(variant)
    layer_nets = [net for layer in detector.layers for net in layer_networks(layer)]
    apply_variant([detector.classifier, *layer_nets], transforms, layer_nets)
    return detector

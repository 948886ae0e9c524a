"""The deep metric model M of ContraNet (paper §4.2): an embedding network used as a triplet network.

``EmbeddingNet.forward(x [B, C, S, S] in [0, 1]) → [B, D]`` embeddings; with ``normalize``
(the default) each row has unit L2 norm, so Euclidean distances between embeddings lie
in ``[0, 2]``.  Architectures (``arch``):

================  ======================================================================
``cnn``           a small plain CNN (conv3×3-BN-ReLU then max-pool per stage, global average
                  pool, linear → D); the CPU profiles (~0.02–0.1 M parameters: it embeds
                  hundreds of reconstructions per batch)
``mobilenet_v2``  torchvision MobileNetV2 with a D-way head (the authors' follow-up code;
                  2.24 M parameters at D = 12, paper Table 1); the paper profiles (GPU)
================  ======================================================================

Grayscale images are fed to MobileNetV2 as three equal channels.  Input scaling to
``[-1, 1]`` lives inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mixdefense.io import load_configured, save_configured

#: distances between embeddings (as in M's training and ContraNet's score)
DISTANCES = ("l2", "cosine")

ARCHS = ("cnn", "mobilenet_v2")
METRIC_FORMAT = "mixdefense.metric/1"


def _cnn(in_channels: int, embedding_dim: int, channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = in_channels
    for i, c in enumerate(channels):
        layers += [nn.Conv2d(cin, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        cin = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, embedding_dim))


class EmbeddingNet(nn.Module):
    """M: images in ``[0, 1]`` → embeddings ``[B, embedding_dim]`` (unit-norm rows with ``normalize``).

    Args:
        in_channels: image channels ``C`` (1 or 3).
        embedding_dim: ``D`` (the authors used 12 for MNIST/CIFAR-10, 50 for GTSRB).
        arch: ``"cnn"`` or ``"mobilenet_v2"`` (see the module docstring).
        channels: stage widths of the ``cnn`` arch (each stage but the last halves the side).
        normalize: L2-normalise the embeddings.
    """

    def __init__(self, in_channels: int = 3, embedding_dim: int = 12, arch: str = "cnn",
                 channels: Sequence[int] = (32, 64, 128), normalize: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown embedding arch {arch!r}; choose one of {ARCHS}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.config = {"in_channels": in_channels, "embedding_dim": embedding_dim, "arch": arch,
                       "channels": list(channels), "normalize": normalize}
        self.in_channels, self.embedding_dim, self.normalize = in_channels, embedding_dim, normalize
        if arch == "cnn":
            self.net = _cnn(in_channels, embedding_dim, channels)
        else:
            self.net = torchvision.models.mobilenet_v2(num_classes=embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"EmbeddingNet expects {self.in_channels}-channel images, got shape {tuple(x.shape)}")
        h = x * 2 - 1
        if self.config["arch"] == "mobilenet_v2" and h.shape[1] == 1:
            h = h.expand(-1, 3, -1, -1)
        e = self.net(h)
        return F.normalize(e, dim=1) if self.normalize else e


def save_metric(model: EmbeddingNet, path, **record) -> None:
    """Write M as a plain-weights file (loads with ``torch.load(weights_only=True)``)."""
    save_configured(model, path, METRIC_FORMAT, **record)


def load_metric(path, map_location="cpu") -> EmbeddingNet:
    """Rebuild an :class:`EmbeddingNet` from :func:`save_metric`'s file, in eval mode."""
    return load_configured(EmbeddingNet, path, METRIC_FORMAT, "metric model", map_location)


def embedding_distance(a: torch.Tensor, b: torch.Tensor, name: str = "l2") -> torch.Tensor:
    """Row-wise distance ``[B]`` between embeddings ``a, b [B, D]`` (normalised first, as in training).

    ``l2``: ``‖â − b̂‖₂ ∈ [0, 2]``; ``cosine``: ``1 − cos(a, b) ∈ [0, 2]``.  Zero for equal rows.
    """
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    if name == "l2":
        return (a - b).pow(2).sum(1).clamp_min(0).sqrt()
    if name == "cosine":
        return (1 - (a * b).sum(1)).clamp_min(0)
    raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")

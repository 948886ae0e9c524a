"""Target classifiers.  Every classifier takes images in ``[0, 1]`` and returns logits.

Input normalisation lives inside the model (a :class:`Normalize` layer), never in the data,
so attacks and detectors all work in the same ``[0, 1]`` pixel scale.

Architectures (``arch``):

=================  ====================================================================
``lenet``          LeNet as in the paper's Table 2 / the authors' code: conv 20 → conv 50
                   → fc 500 → fc classes (MNIST, 28×28 or 32×32).
``resnet_small``   CIFAR-style pre-activation-free ResNet (He et al. 2016, §4.2):
                   3 stages of ``blocks`` basic blocks with ``widths`` channels.  Depth 20
                   with widths (16, 32, 64) is ResNet-20; the CPU profiles use it.
``densenet169``    torchvision DenseNet-169 adapted to 32×32 (3×3 stem, no max-pool):
                   the paper's CIFAR-10 model (paper-sized profile, GPU).
``resnet34``       torchvision ResNet-34 adapted to 32×32 (3×3 stem, no max-pool):
                   the paper's GTSRB model (paper-sized profile, GPU).
``vgg``            torchvision VGG with batch norm (Simonyan & Zisserman 2015): the conv
                   stack ``cfg`` (``torchvision.models.vgg.make_layers``; channels, ``"M"``
                   for a 2×2 max-pool), then global average pooling and one linear layer.
                   A plain CNN without skip connections; the default ``cfg`` (two convs at
                   32, 64, 128 channels, 0.29 M parameters, ResNet-20's size) is the
                   second CIFAR-10 classifier of the plug-and-play check.
=================  ====================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from mixdefense.io import atomic_torch_save, load_tagged
from mixdefense.validation import check_images

#: Per-dataset channel statistics of the training sets in [0, 1] scale.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "gtsrb": ((0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
}

CLASSIFIER_FORMAT = "mixdefense.classifier/1"


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers saved with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LeNet(nn.Module):
    """LeNet-5 variant: conv(20, 5×5) → pool → conv(50, 5×5) → pool → fc 500 → fc classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * side * side, 500), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """3×3 → 3×3 residual block with batch norm; a 1×1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, three stages (stride 1, 2, 2), global average pool."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks: Sequence[int] = (3, 3, 3),
        widths: Sequence[int] = (16, 32, 64),
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks {blocks} and widths {widths} must have the same length")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            for i in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (stage > 0 and i == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _densenet169_32(num_classes: int, in_channels: int) -> nn.Module:
    net = torchvision.models.densenet169(weights=None, num_classes=num_classes)
    width = net.features.conv0.out_channels
    net.features.conv0 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    net.features.pool0 = nn.Identity()
    return net


def _resnet34_32(num_classes: int, in_channels: int) -> nn.Module:
    net = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


#: the ``vgg`` architecture's default conv stack: channels per 3×3 conv, "M" a 2×2 max-pool
VGG_SMALL_CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M")


class VGGSmall(nn.Module):
    """torchvision's VGG conv stack with batch norm (``torchvision.models.vgg.make_layers(cfg)``), then a global
    average pool and one linear layer in place of VGG's 7×7 pool and 4096-wide head (a 32×32 image is 4×4 after three
    pools).  ``cfg``: channels per 3×3 conv, ``"M"`` a 2×2 max-pool; ``dropout`` before the linear layer."""

    def __init__(self, num_classes: int, in_channels: int = 3, cfg: Sequence[int | str] = VGG_SMALL_CFG,
                 dropout: float = 0.0):
        super().__init__()
        cfg = list(cfg)
        widths = [c for c in cfg if c != "M"]
        if not widths or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in widths):
            raise ValueError(f"vgg cfg needs positive channel counts and 'M' entries, got {cfg}")
        self.features = torchvision.models.vgg.make_layers(cfg, batch_norm=True)
        if in_channels != 3:   # make_layers always starts from 3 channels
            self.features[0] = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], num_classes))
        for m in self.modules():   # torchvision VGG's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


ARCHITECTURES = ("lenet", "resnet_small", "densenet169", "resnet34", "vgg")


class Classifier(nn.Module):
    """A target classifier: ``logits = backbone(normalize(x))`` for ``x`` in ``[0, 1]``.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        num_classes: number of output logits.
        in_channels: 1 (grayscale) or 3 (RGB).
        image_size: input side length ``H = W`` in pixels.
        mean, std: per-channel normalisation statistics (``[0, 1]`` scale); default from
            :data:`NORMALIZATION` by ``dataset``.
        dataset: a key of :data:`NORMALIZATION`, used only for the default mean/std.
        arch_kwargs: extra keyword arguments of the backbone (e.g. ``blocks``, ``widths``).

    ``forward(x)``: ``x`` is ``[B, in_channels, image_size, image_size]`` in ``[0, 1]``;
    returns logits ``[B, num_classes]``.  It does not validate (it sits inside attacks'
    inner loops); call :meth:`check_input` at a boundary.
    """

    def __init__(
        self,
        arch: str = "lenet",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dataset: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown classifier arch {arch!r}; choose one of {ARCHITECTURES}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if mean is None or std is None:
            if dataset is None:
                mean, std = (0.5,) * in_channels, (0.5,) * in_channels
            else:
                if dataset not in NORMALIZATION:
                    raise ValueError(f"no default normalisation for dataset {dataset!r}; pass mean and std")
                mean, std = NORMALIZATION[dataset]
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
        arch_kwargs = dict(arch_kwargs or {})
        self.config = {
            "arch": arch, "num_classes": num_classes, "in_channels": in_channels, "image_size": image_size,
            "mean": list(map(float, mean)), "std": list(map(float, std)), "arch_kwargs": arch_kwargs,
        }
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.normalize = Normalize(mean, std)
        if arch == "lenet":
            self.backbone = LeNet(num_classes, in_channels, image_size, **arch_kwargs)
        elif arch == "resnet_small":
            self.backbone = ResNetSmall(num_classes, in_channels, **arch_kwargs)
        elif arch == "densenet169":
            self.backbone = _densenet169_32(num_classes, in_channels)
        elif arch == "vgg":
            self.backbone = VGGSmall(num_classes, in_channels, **arch_kwargs)
        else:
            self.backbone = _resnet34_32(num_classes, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` against this classifier's channels and size (see :func:`check_images`)."""
        return check_images(x, channels=self.in_channels, size=self.image_size)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels ``[B]`` (argmax of the logits), in eval mode, batched."""
        self.check_input(x)
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(chunk).argmax(1) for chunk in x.split(batch_size)])
        finally:
            self.train(was_training)


class UsesClassifier:
    """Mixin for a detector layer that reads the pipeline's classifier without owning it
    (Feature Squeezing, MagNet): :class:`~mixdefense.pipeline.MixDefense` calls :meth:`bind`.
    The classifier is kept in a list, so it is not a submodule and not in the layer's ``state_dict``."""

    _classifier: list[nn.Module]

    def bind(self, classifier: nn.Module):
        """Use ``classifier`` (images in ``[0, 1]`` → logits)."""
        self._classifier = [classifier]
        return self

    @property
    def classifier(self) -> nn.Module:
        if not getattr(self, "_classifier", None):
            raise RuntimeError(f"{type(self).__name__} has no classifier: bind(classifier) first (MixDefense does it)")
        return self._classifier[0]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits on ``x`` in eval mode (its mode is restored)."""
        clf = self.classifier
        was_training = clf.training
        clf.eval()
        try:
            return clf(x)
        finally:
            clf.train(was_training)


def num_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def save_classifier(model: Classifier, path: str | Path, **metadata: Any) -> Path:
    """Save a classifier as a plain ``{"config", "state_dict", "metadata"}`` file.

    The file loads with ``torch.load(path, weights_only=True)``: no pickled code.
    """
    payload = {
        "format": CLASSIFIER_FORMAT,
        "config": model.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata,
    }
    return atomic_torch_save(payload, path)


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """Load a classifier written by :func:`save_classifier` (safe: ``weights_only=True``)."""
    payload = load_tagged(path, CLASSIFIER_FORMAT, "classifier", map_location)
    model = Classifier(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()

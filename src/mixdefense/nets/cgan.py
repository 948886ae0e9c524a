"""The revised cGAN of ContraNet (paper §4.1, Figure 4): encoder, CBN generator, projection D.

Shapes and ranges (``S`` = image side, a multiple of 8; ``C`` = image channels; ``K`` =
number of classes; ``Z`` = latent size):

* :class:`Encoder` ``q(z|x)``: ``x [B, C, S, S]`` in ``[0, 1]`` → ``(μ, log σ²)`` each
  ``[B, Z]``; :meth:`Encoder.sample` draws ``z = μ + σ·ε`` (reparameterised).
* :class:`Generator` ``p(x|z, y)``: ``z [B, Z]``, ``y [B]`` int → image ``[B, C, S, S]`` in
  ``[0, 1]`` (sigmoid output).  A class-conditional batch norm (:class:`ConditionalBatchNorm2d`)
  sits in every layer; optionally a class embedding is also concatenated to ``z``.
* :class:`ProjectionDiscriminator` (Miyato & Koyama 2018): ``D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩``
  → ``[B]`` unbounded logits; spectral norm on every weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


class ConditionalBatchNorm2d(nn.Module):
    """Batch norm without affine parameters whose per-channel γ, β come from the class label.

    ``forward(x [B, F, H, W], y [B]) = BN(x) · γ[y] + β[y]``; γ starts at 1 and β at 0.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.gamma(y)[:, :, None, None] + self.beta(y)[:, :, None, None]


class Encoder(nn.Module):
    """DCGAN-style encoder: 4×4 stride-2 convs (BN, LeakyReLU 0.2) → linear heads for μ and log σ².

    Args:
        in_channels: image channels ``C``.
        image_size: side ``S`` (divisible by 2^len(channels)).
        channels: widths of the strided convolutions.
        latent_dim: ``Z``.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, channels: Sequence[int] = (64, 128, 256), latent_dim: int = 80):
        super().__init__()
        if image_size % (2 ** len(channels)):
            raise ValueError(f"image_size {image_size} must be divisible by {2 ** len(channels)}")
        layers, cin = [], in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, c, 4, 2, 1, bias=i == 0)]
            if i > 0:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            cin = c
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = cin * (image_size // 2 ** len(channels)) ** 2
        self.mu = nn.Linear(flat, latent_dim)
        self.logvar = nn.Linear(flat, latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x * 2 - 1)  # [0, 1] → [-1, 1]
        return self.mu(h), self.logvar(h).clamp(-20.0, 10.0)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, μ, log σ²)`` with ``z = μ + exp(log σ² / 2) · ε``, ``ε ~ N(0, I)``."""
        mu, logvar = self(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + (0.5 * logvar).exp() * eps, mu, logvar


class _UpBlock(nn.Module):
    """CBN → ReLU → ×2 upsample → conv3×3 → CBN → ReLU → conv3×3, plus an upsampled 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, num_classes: int):
        super().__init__()
        self.bn1 = ConditionalBatchNorm2d(cin, num_classes)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.bn2 = ConditionalBatchNorm2d(cout, num_classes)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    """ResNet generator from ``z`` and a label: linear → ``S/8``² map → three ×2 up-blocks → image.

    Args:
        out_channels: image channels ``C``.
        image_size: side ``S`` (multiple of 8).
        latent_dim: ``Z``.
        num_classes: ``K``.
        channels: four widths: the initial map, then each up-block's output.
        embed_dim: if > 0, a class embedding of this size is concatenated to ``z`` (the
            condition then enters G twice: through the input and through every CBN).
    """

    def __init__(self, out_channels: int = 3, image_size: int = 32, latent_dim: int = 80, num_classes: int = 10,
                 channels: Sequence[int] = (256, 256, 128, 64), embed_dim: int = 0):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        if len(channels) != 4:
            raise ValueError(f"channels needs 4 widths (initial map + 3 up-blocks), got {channels}")
        self.base = image_size // 8
        self.embed = nn.Embedding(num_classes, embed_dim) if embed_dim > 0 else None
        self.fc = nn.Linear(latent_dim + max(embed_dim, 0), channels[0] * self.base ** 2)
        self.blocks = nn.ModuleList(_UpBlock(channels[i], channels[i + 1], num_classes) for i in range(3))
        self.bn_out = ConditionalBatchNorm2d(channels[3], num_classes)
        self.conv_out = nn.Conv2d(channels[3], out_channels, 3, 1, 1)
        self.latent_dim, self.num_classes, self.channels0 = latent_dim, num_classes, channels[0]

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.fc(z).view(z.shape[0], self.channels0, self.base, self.base)
        for block in self.blocks:
            h = block(h, y)
        return torch.sigmoid(self.conv_out(F.relu(self.bn_out(h, y))))


class _DownBlock(nn.Module):
    """Spectral-norm residual block: ReLU → conv3×3 → ReLU → conv3×3 → avg-pool, 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, downsample: bool, preactivate: bool = True):
        super().__init__()
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, 1, 1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, 1, 1))
        self.shortcut = spectral_norm(nn.Conv2d(cin, cout, 1))
        self.downsample, self.preactivate = downsample, preactivate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivate else x
        h = self.conv2(F.relu(self.conv1(h)))
        s = self.shortcut(x)
        if self.downsample:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class ProjectionDiscriminator(nn.Module):
    """``D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩`` with φ = residual blocks + ReLU + global sum pool.

    Args:
        in_channels: image channels ``C``.
        num_classes: ``K``.
        channels: widths of the residual blocks (the first three downsample).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: Sequence[int] = (128, 128, 128, 128)):
        super().__init__()
        blocks, cin = [], in_channels
        for i, c in enumerate(channels):
            blocks.append(_DownBlock(cin, c, downsample=i < 3, preactivate=i > 0))
            cin = c
        self.phi = nn.Sequential(*blocks)
        self.psi = spectral_norm(nn.Linear(cin, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, cin))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) ``[B, F]``."""
        return F.relu(self.phi(x * 2 - 1)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.psi(h).squeeze(1) + (self.embed(y) * h).sum(1)

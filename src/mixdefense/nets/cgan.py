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

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None, scale: float = 1.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, μ, log σ²)`` with ``z = μ + scale · exp(log σ² / 2) · ε``, ``ε ~ N(0, I)`` (drawn with
        ``generator`` on its own device, then moved to ``μ``'s)."""
        mu, logvar = self(x)
        device = generator.device if generator is not None else mu.device
        eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype).to(mu.device)
        return mu + scale * (0.5 * logvar).exp() * eps, mu, logvar


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


class LabelCritic(nn.Module):
    """A small CNN classifier ``x [B, C, S, S] in [0, 1] → logits [B, K]`` (conv 32 → 64 → 128, global pool).

    The discriminator's class critic for label binding; trained on real images only.  No
    batch norm: it scores batches of fakes, and batch statistics would let G game it.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        layers, cin = [], in_channels
        for c in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, c, 3, 1, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class ProjectionDiscriminator(nn.Module):
    """``D(x, y) = ψ(φ(x)) + ⟨embed(y), φ(x)⟩`` with φ = residual blocks + ReLU + global sum pool.

    With ``aux_classifier`` D also carries a class critic ``c(x) → [B, K]`` logits (AC-GAN
    style, Odena et al. 2017), trained on real images only; the generator is then asked to
    make ``c`` read its output as the label it was given — a direct pressure on G to obey
    the label (label binding) that the projection term alone does not exert on
    reconstructions whose latent already carries the class.  The critic is a small plain
    CNN of its own (:class:`LabelCritic`), not a head on φ: φ is spectrally normalised and
    shaped by the real/fake game, and a head on it learned the classes too slowly to guide
    G (``benchmarks/results/cgan_probe_mnist.md``).

    Args:
        in_channels: image channels ``C``.
        num_classes: ``K``.
        channels: widths of the residual blocks (the first three downsample).
        aux_classifier: add the class critic.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels: Sequence[int] = (128, 128, 128, 128),
                 aux_classifier: bool = False):
        super().__init__()
        blocks, cin = [], in_channels
        for i, c in enumerate(channels):
            blocks.append(_DownBlock(cin, c, downsample=i < 3, preactivate=i > 0))
            cin = c
        self.phi = nn.Sequential(*blocks)
        self.psi = spectral_norm(nn.Linear(cin, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, cin))
        self.classifier = LabelCritic(in_channels, num_classes) if aux_classifier else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) ``[B, F]``."""
        return F.relu(self.phi(x * 2 - 1)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.score_and_classify(x, y)[0]

    def score_and_classify(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(D(x, y) [B], class logits [B, K] or None)`` from one pass of φ."""
        h = self.features(x)
        return self.score_features(h, y), (self.classifier(x) if self.classifier is not None else None)

    def score_features(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``D`` from precomputed features ``h = φ(x)`` ``[B, F]``: scoring other labels costs no convolution."""
        return self.psi(h).squeeze(1) + (self.embed(y) * h).sum(1)


CGAN_FORMAT = "mixdefense.cgan/1"


class Reconstructor(nn.Module):
    """The trained cGAN as ContraNet uses it: ``x, y → G(μ(x), y)`` (the discriminator is not kept).

    ``forward(x [B, C, S, S] in [0, 1], y [B] int64) → [B, C, S, S]`` in ``[0, 1]``; deterministic
    (the encoder mean, no sampling).  :attr:`config` holds the constructor settings, so
    :func:`load_cgan` can rebuild it from a plain-weights file.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, num_classes: int = 10, latent_dim: int = 80,
                 enc_channels: Sequence[int] = (64, 128, 256), gen_channels: Sequence[int] = (256, 256, 128, 64),
                 gen_embed_dim: int = 0):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes,
                       "latent_dim": latent_dim, "enc_channels": list(enc_channels), "gen_channels": list(gen_channels),
                       "gen_embed_dim": gen_embed_dim}
        self.encoder = Encoder(in_channels, image_size, enc_channels, latent_dim)
        self.generator = Generator(in_channels, image_size, latent_dim, num_classes, gen_channels, gen_embed_dim)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.generator(self.encoder(x)[0], y)


def save_cgan(model: Reconstructor, path, **record) -> None:
    """Write ``model`` (encoder + generator) as a plain-weights file (``torch.load(weights_only=True)``)."""
    from mixdefense.io import save_configured

    save_configured(model, path, CGAN_FORMAT, **record)


def load_cgan(path, map_location="cpu") -> Reconstructor:
    """Rebuild a :class:`Reconstructor` from :func:`save_cgan`'s file, in eval mode."""
    from mixdefense.io import load_configured

    return load_configured(Reconstructor, path, CGAN_FORMAT, "cGAN", map_location)

"""Training of MagNet's autoencoder (Meng & Chen, CCS 2017) on clean images, a baseline defense.

Per batch of clean ``x`` in ``[0, 1]``: ``x̃ = clip(x + σ·N(0, I), 0, 1)`` (σ = ``noise``, the
paper's 0.1) and the loss ``MSE(AE(x̃), x)`` (+ ``weight_decay``·‖θ‖² through AdamW).  Logged:
``train/loss``, ``val/mse`` (clean inputs, no noise: what the detector measures) and ``val/l1``.
The best checkpoint by ``val/mse`` is exported as a plain-weights file
(:class:`lightning_modules.ExportAutoencoder`); ``mixdefense baselines calibrate`` then sets
MagNet's thresholds on it.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from mixdefense.layers.magnet import MagNetAutoencoder


class AutoencoderModule(pl.LightningModule):
    """Denoising training of :class:`mixdefense.layers.magnet.MagNetAutoencoder`.

    Args:
        in_channels, hidden, pool: the autoencoder (see :class:`~mixdefense.layers.magnet.MagNetAutoencoder`).
        noise: σ of the Gaussian noise on the training inputs ([0, 1] pixel units).
        lr, weight_decay: Adam(W) settings.
    """

    def __init__(self, in_channels: int = 1, hidden: tuple[int, ...] = (3, 3), pool: bool = True,
                 noise: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.save_hyperparameters()
        self.autoencoder = MagNetAutoencoder(in_channels, hidden, pool)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        noisy = (x + self.hparams.noise * torch.randn_like(x)).clamp(0, 1)
        loss = F.mse_loss(self.autoencoder(noisy), x)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        rec = self.autoencoder(x)
        self.log("val/mse", F.mse_loss(rec, x), prog_bar=True, on_epoch=True, sync_dist=True)
        self.log("val/l1", F.l1_loss(rec, x), on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        params = self.autoencoder.parameters()
        wd = self.hparams.weight_decay
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=wd) if wd else torch.optim.Adam(params, lr=self.hparams.lr)

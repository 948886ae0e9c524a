"""Supervised training of a target classifier (:class:`mixdefense.classifiers.Classifier`)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from mixdefense.classifiers import Classifier


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of a :class:`~mixdefense.classifiers.Classifier`.

    Args:
        arch, num_classes, in_channels, image_size, dataset, arch_kwargs: the classifier
            (see :class:`~mixdefense.classifiers.Classifier`).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adam"``.
        lr: peak learning rate.
        weight_decay: L2 weight decay (not applied to batch-norm and bias parameters).
        momentum: SGD momentum.
        scheduler: ``"onecycle"`` (per step), ``"cosine"`` (per step, to 0) or ``"none"``.
        warmup_fraction: share of the steps spent warming up (``onecycle`` only).
        label_smoothing: cross-entropy label smoothing.
        channels_last: use the channels-last memory format (faster convolutions on CPU).
    """

    def __init__(
        self,
        arch: str = "lenet",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dataset: str | None = None,
        arch_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        warmup_fraction: float = 0.15,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
    ):
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if scheduler not in ("onecycle", "cosine", "none"):
            raise ValueError(f"scheduler must be 'onecycle', 'cosine' or 'none', got {scheduler!r}")
        self.save_hyperparameters()
        self.model = Classifier(arch, num_classes, in_channels, image_size, dataset=dataset, arch_kwargs=arch_kwargs)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        metric.update(logits.detach().float(), y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=stage == "train", on_epoch=True, sync_dist=stage != "train")
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_acc, "test")

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.hparams.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=self.hparams.lr) if self.hparams.weight_decay else torch.optim.Adam(groups, lr=self.hparams.lr)
        if self.hparams.scheduler == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=total, pct_start=self.hparams.warmup_fraction)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

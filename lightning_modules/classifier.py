"""Supervised training of a target classifier (:class:`mixdefense.classifiers.Classifier`)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.callbacks import ResumableRNG
from mixdefense.attacks import run_attack
from mixdefense.classifiers import Classifier, load_classifier

ADVERSARIAL_KEYS = {"eps", "alpha", "steps", "norm", "random_start", "ramp_epochs"}


def _check_adversarial(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validated PGD-training settings (defaults: L∞, random start) or ``None``."""
    if not cfg:
        return None
    unknown = set(cfg) - ADVERSARIAL_KEYS
    if unknown:
        raise ValueError(f"adversarial: unknown keys {sorted(unknown)}; expected {sorted(ADVERSARIAL_KEYS)}")
    out = {"norm": "linf", "random_start": True, "ramp_epochs": 0.0, **cfg}
    if out["ramp_epochs"] < 0:
        raise ValueError(f"adversarial.ramp_epochs must be >= 0, got {out['ramp_epochs']}")
    if out["norm"] not in ("linf", "l2"):
        raise ValueError(f"adversarial.norm must be 'linf' or 'l2', got {out['norm']!r}")
    for key in ("eps", "alpha", "steps"):
        if key not in out or not out[key] > 0:
            raise ValueError(f"adversarial.{key} must be given and > 0 (got {out.get(key)!r})")
    out["steps"] = int(out["steps"])
    return out


class ClassifierModule(ResumableRNG, pl.LightningModule):
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
        adversarial: PGD adversarial training (Madry et al. 2018) when given:
            ``{eps, alpha, steps, norm: linf|l2, random_start: true, ramp_epochs: 0}`` (ε, α in
            [0, 1] pixel units; L2 over the whole image).  Every training batch is replaced by its
            PGD AEs against the current model (made in eval mode); validation logs the clean
            accuracy and ``val/robust_acc`` under the full budget.  With ``ramp_epochs > 0`` the
            training budget (and step) grows linearly from 0 to ``eps`` over that many epochs (a
            curriculum: at MNIST's ε = 0.3 from the start, a small net stalls at chance level).
        init_weights: start from a plain-weights classifier file (e.g. adversarial fine-tuning
            of ``artifacts/<ds>/classifier.pt``); its configuration must match.
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
        adversarial: dict[str, Any] | None = None,
        init_weights: str | None = None,
    ):
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if scheduler not in ("onecycle", "cosine", "none"):
            raise ValueError(f"scheduler must be 'onecycle', 'cosine' or 'none', got {scheduler!r}")
        self.adversarial = _check_adversarial(adversarial)
        self.save_hyperparameters()
        self.model = Classifier(arch, num_classes, in_channels, image_size, dataset=dataset, arch_kwargs=arch_kwargs)
        if init_weights:
            start = load_classifier(init_weights)
            if start.config != self.model.config:
                raise ValueError(f"init_weights {init_weights}: its classifier config {start.config} "
                                 f"differs from {self.model.config}")
            self.model.load_state_dict(start.state_dict())
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_robust_acc = MulticlassAccuracy(num_classes, average="micro")

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

    def attack(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """PGD AEs of ``(x, y)`` against the current model (eval mode), with ``adversarial``'s settings
        (ε and α times ``scale``)."""
        cfg = self.adversarial
        with torch.inference_mode(False), torch.enable_grad():
            return run_attack(f"pgd_{cfg['norm']}", self.model, x.clone(), y.clone(), cfg["eps"] * scale,
                              steps=cfg["steps"], alpha=cfg["alpha"] * scale, random_start=cfg["random_start"])

    def budget_scale(self, batch_idx: int) -> float:
        """The curriculum's share of ε at this training step (1 without a ramp)."""
        ramp = self.adversarial["ramp_epochs"]
        if not ramp:
            return 1.0
        per_epoch = max(int(self.trainer.num_training_batches), 1) if self._trainer is not None else 1
        return min(1.0, (self.current_epoch + (batch_idx + 1) / per_epoch) / ramp)

    def training_step(self, batch, batch_idx):
        if self.adversarial:
            x, y = batch
            scale = self.budget_scale(batch_idx)
            self.log("train/eps", self.adversarial["eps"] * scale, on_step=True, on_epoch=False)
            batch = (self.attack(x, y, scale), y)
        return self._step(batch, self.train_acc, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_acc, "val")
        if self.adversarial:
            x, y = batch
            self.val_robust_acc.update(self(self.attack(x, y)).detach().float(), y)
            self.log("val/robust_acc", self.val_robust_acc, prog_bar=True, on_step=False, on_epoch=True)

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

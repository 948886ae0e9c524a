"""Callbacks shared by the training stages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from mixdefense.classifiers import save_classifier
from mixdefense.io import portable_path
from mixdefense.layers.magnet import save_autoencoder
from mixdefense.nets import save_cgan, save_metric


def load_submodule(module: torch.nn.Module, checkpoint: dict, prefix: str) -> torch.nn.Module:
    """A fresh copy of ``module`` (rebuilt from its ``config``) with the weights stored under ``prefix``
    in a Lightning checkpoint's ``state_dict`` (e.g. ``"model."``, ``"reconstructor."``)."""
    fresh = type(module)(**module.config)
    fresh.load_state_dict({k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)})
    return fresh


class WallClock(pl.Callback):
    """Logs ``time/train_s``: wall-clock seconds of training so far, at every validation.

    The CSV log then holds validation accuracy against training time (the curve the
    CPU profiles report).  Time spent in validation is not counted.
    """

    def __init__(self):
        self.elapsed = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._start is not None:
            self.elapsed += time.perf_counter() - self._start
            self._start = None
        pl_module.log("time/train_s", self.elapsed, on_epoch=True, on_step=False)

    def state_dict(self):
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state_dict):
        self.elapsed = float(state_dict.get("elapsed", 0.0))


class ExportClassifier(pl.Callback):
    """At the end of ``fit`` (and ``test``), write the best classifier as a plain weights file.

    The file (see :func:`mixdefense.classifiers.save_classifier`) is small, loads with
    ``torch.load(..., weights_only=True)`` and needs no Lightning.  A JSON summary
    (``<path>.json``) records the checkpoint it came from and its metrics.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: str) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        if not trainer.is_global_zero:
            return
        model = pl_module.model
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        if source == "fit" and best:
            model = load_submodule(model, torch.load(best, map_location="cpu", weights_only=True), "model.")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        save_classifier(model.to(memory_format=torch.contiguous_format), self.path, source_checkpoint=portable_path(best),
                        metrics=metrics)
        summary_path = self.path.with_suffix(".json")
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if source == "fit":
            summary = {}  # a new fit starts a new record
        summary.update({"path": str(self.path), "size_bytes": self.path.stat().st_size})
        summary[source] = {"source_checkpoint": portable_path(best), "metrics": metrics}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"exported classifier to {self.path} ({summary['size_bytes'] / 1e6:.2f} MB)")

    def on_fit_end(self, trainer, pl_module):
        self._export(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module):
        self._export(trainer, pl_module, "test")


def training_data_record(datamodule) -> dict:
    """What a part was trained on, for its record: the dataset and how its validation images were held out
    (``val_grouping``: a part calibrated on ``val_groups`` must have been trained with ``"groups"``); ``{}``
    without an :class:`~datamodules.base.ImageDataModule`."""
    if datamodule is None or not hasattr(datamodule, "val_grouping"):
        return {}
    return {"dataset": datamodule.name, "val_fraction": datamodule.val_fraction, "seed": datamodule.seed,
            "val_grouping": datamodule.val_grouping, "train_subset": datamodule.train_subset}


class ExportBestSubmodule(pl.Callback):
    """At the end of ``fit``, write one submodule of the LightningModule as a plain weights file.

    The weights are the best checkpoint's when a ``ModelCheckpoint`` monitors a metric, else
    the weights at the end of training.  Subclasses name the submodule (``attribute``), the
    saver (``save(module, path, **record)``) and what it is (``what``).  A JSON summary
    beside the file records the source checkpoint, its monitored metric, and the run's
    epochs and steps.
    """

    attribute: str = ""
    what: str = ""

    def __init__(self, path: str):
        self.path = Path(path)

    @staticmethod
    def save(module: torch.nn.Module, path: Path, **record) -> None:
        raise NotImplementedError

    @staticmethod
    def _best_checkpoint(trainer) -> tuple[str, dict]:
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) and getattr(cb, "best_model_path", ""):
                score = cb.best_model_score
                return cb.best_model_path, {cb.monitor: float(score) if score is not None else None}
        return "", {}

    def on_fit_end(self, trainer, pl_module):
        if getattr(trainer, "fast_dev_run", False) or not trainer.is_global_zero:
            return
        model = getattr(pl_module, self.attribute)
        best, best_metric = self._best_checkpoint(trainer)
        if best:
            checkpoint = torch.load(best, map_location="cpu", weights_only=True)
            model = load_submodule(model, checkpoint, self.attribute + ".")
            best_metric["global_step"] = checkpoint.get("global_step")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        record = {"epochs": trainer.current_epoch, "global_step": trainer.global_step, "source_checkpoint": portable_path(best),
                  "best": best_metric or None, "last_metrics": metrics}
        data = training_data_record(getattr(trainer, "datamodule", None))
        if data:
            record["data"] = data
        self.save(model, self.path, **record)
        summary = {"path": str(self.path), "size_bytes": self.path.stat().st_size, "config": model.config, **record}
        self.path.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"exported {self.what} from {best or 'the last step'} to {self.path} ({summary['size_bytes'] / 1e6:.2f} MB)")


class ExportCGAN(ExportBestSubmodule):
    """Export the cGAN's encoder and generator (:func:`mixdefense.nets.save_cgan`; loads with
    :func:`mixdefense.nets.load_cgan`, ``weights_only=True``, no Lightning).  The configs keep
    the best checkpoint by ``val/select`` = validation SSIM × label binding (the paper variant,
    which uses no classifier, by ``val/ssim``): a GAN's last step is not always its best."""

    attribute, what = "reconstructor", "cGAN (encoder + generator)"
    save = staticmethod(save_cgan)


class ExportAutoencoder(ExportBestSubmodule):
    """Export MagNet's autoencoder (:func:`mixdefense.layers.magnet.save_autoencoder`); the configs keep the
    best checkpoint by ``val/mse``."""

    attribute, what = "autoencoder", "MagNet autoencoder"
    save = staticmethod(save_autoencoder)


class ExportMetric(ExportBestSubmodule):
    """Export ContraNet's embedding net M (:func:`mixdefense.nets.save_metric`); the configs keep
    the best checkpoint by ``val/auroc``."""

    attribute, what = "metric", "metric model M"
    save = staticmethod(save_metric)


def rng_state() -> dict:
    """The states of the random generators a training step draws from (torch CPU and CUDA, NumPy,
    Python's ``random``), as plain tensors, ints and tuples (a ``weights_only`` checkpoint holds them)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what :func:`rng_state` recorded."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableRNG:
    """LightningModule mixin: every checkpoint carries the random generators' states, and resuming
    from it restores them (single-process runs), so a run resumed from an end-of-epoch
    ``last.ckpt`` draws the same shuffles, augmentations and dropout masks as an uninterrupted run
    of the same seed, and ends with the same weights.  (From a mid-epoch checkpoint the rest of
    that epoch is reshuffled: Lightning restarts a plain DataLoader's iterator.)"""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_state()
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        trainer = getattr(self, "_trainer", None)
        if "rng_states" in checkpoint and (trainer is None or trainer.world_size == 1):
            restore_rng(checkpoint["rng_states"])
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

"""Training faults (issue #10): bad configs fail at start-up, a diverging cGAN stops and keeps its
last good checkpoint, and (slow) a killed run resumes from ``last.ckpt`` to the same metrics.

The slow kill-and-resume tests start ``mixdefense fit`` in a subprocess, wait for ``last.ckpt``,
kill the run with SIGKILL in the middle of an epoch, resume it with ``--ckpt_path .../last.ckpt``
and compare the final metrics with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.cgan import CGANModule
from mixdefense.cli import main

REPO = Path(__file__).resolve().parents[1]

# Every Lightning stage composes with the shared blocks first (the header of each experiments/<ds>/<stage>.yaml).
COMMON = ["--config", str(REPO / "experiments/common/trainer.yaml"), "--config", str(REPO / "experiments/common/loggers.yaml")]


pytestmark = pytest.mark.usefixtures("one_thread")
CLASSIFIER_CFG = REPO / "experiments/mnist/classifier.yaml"


# -- config errors: one clear error at start-up, before any training -------------------------
def _fit_must_stop(args: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """Run ``mixdefense fit --config classifier.yaml ARGS`` in ``tmp_path``; it must exit non-zero
    before training (no run folder, no checkpoint).  Returns what it printed on stderr."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *COMMON, "--config", str(CLASSIFIER_CFG), "--trainer.accelerator=cpu", *args])
    assert stop.value.code not in (0, None)
    out = capsys.readouterr()
    assert "Epoch" not in out.out + out.err and "Traceback" not in out.err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "runs").exists()
    return out.err


@pytest.mark.parametrize("arg,expected", [
    ("--model.init_args.not_a_key=1", "Option 'not_a_key' is not accepted"),
    ("--data.init_args.batch_sise=64", "Option 'batch_sise' is not accepted"),
    ("--trainer.max_epoch=3", "unrecognized arguments: --trainer.max_epoch=3"),  # no prefix matching
    ("--no_such_section.key=1", "no_such_section"),
], ids=["model_key", "data_key", "trainer_key", "section"])
def test_an_unknown_config_key_stops_at_start_up(arg, expected, tmp_path, monkeypatch, capsys):
    assert expected in _fit_must_stop([arg], tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("arg,expected", [
    ("--model.init_args.lr=fast", r"Expected a <class 'float'>. Got value: fast"),
    ("--trainer.max_epochs=two", "Expected a <class 'int'>"),
    ("--data.init_args.augment=maybe", "augment"),
], ids=["float", "int", "bool"])
def test_a_wrong_type_stops_at_start_up(arg, expected, tmp_path, monkeypatch, capsys):
    import re

    assert re.search(expected, _fit_must_stop([arg], tmp_path, monkeypatch, capsys))


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_a_missing_ckpt_path_stops_at_start_up(form, tmp_path, monkeypatch, capsys):
    args = ["--ckpt_path", "missing.ckpt"] if form == "separate" else ["--ckpt_path=missing.ckpt"]
    err = _fit_must_stop(args, tmp_path, monkeypatch, capsys)
    assert err.strip() == "mixdefense fit: checkpoint (--ckpt_path) file not found: missing.ckpt"  # one line


def test_a_missing_binding_classifier_stops_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match="binding_classifier not found: nowhere.pt"):
        main(["fit", *COMMON, "--config", str(REPO / "experiments/mnist/cgan.yaml"), "--trainer.accelerator=cpu",
              "--trainer.logger=false", "--model.init_args.binding_classifier=nowhere.pt"])
    assert not (tmp_path / "checkpoints").exists()


# -- a diverging cGAN ------------------------------------------------------------------------
def _tiny_cgan() -> CGANModule:
    return CGANModule(in_channels=1, image_size=16, num_classes=4, latent_dim=4, enc_channels=(4, 8, 8),
                      gen_channels=(8, 8, 8, 4), dis_channels=(4, 4, 4, 4), w_cls=1.0)


def _poisoned_loader(bad_batch: int | None, n_batches: int = 4, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_batches * batch, 1, 16, 16, generator=g)
    if bad_batch is not None:
        x[bad_batch * batch] = float("nan")  # one poisoned image
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (len(x),), generator=g)), batch_size=batch, shuffle=False)


class Snapshots(pl.Callback):
    """The module's weights after every completed batch."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[batch_idx] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _fit_until_divergence(model: CGANModule, loader: DataLoader, tmp_path: Path) -> tuple[Snapshots, Path, str]:
    snaps = Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=3)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[snaps, ckpt],
                         default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(model, loader)
    return snaps, tmp_path / "ckpt" / "last.ckpt", str(info.value)


def _assert_last_good_checkpoint(last: Path, good: dict[str, torch.Tensor], step: int) -> None:
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == step
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    for k, v in good.items():
        assert torch.equal(saved["state_dict"][k], v), k


def test_a_nan_loss_stops_the_cgan_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _tiny_cgan()
    snaps, last, message = _fit_until_divergence(model, _poisoned_loader(bad_batch=2), tmp_path)
    assert "cGAN training diverged at step 6 (epoch 0): generator loss is nan" in message
    assert "no non-finite weights were applied" in message and str(last) in message
    assert sorted(snaps.after) == [0, 1]  # batch 2 never completed
    _assert_last_good_checkpoint(last, snaps.after[1], step=6)  # 3 optimizer steps per batch
    # no NaN reached the weights in memory either: it stopped before G's optimizer step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_inf_gradient_stops_the_cgan_before_the_step(tmp_path):
    """A finite loss whose backward pass overflows (here: an injected Inf gradient in the encoder
    at batch 2) stops before the encoder's optimizer step."""
    model = _tiny_cgan()
    param = next(model.encoder.parameters())
    state = {"batch": -1}

    class Arm(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["batch"] = batch_idx

    param.register_hook(lambda g: g * float("inf") if state["batch"] == 2 else g)
    snaps = Snapshots()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=3)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[Arm(), snaps, ckpt])
    before = param.detach().clone()
    with pytest.raises(FloatingPointError, match=r"diverged at step 7 \(epoch 0\): encoder gradient is NaN or Inf \(finite loss\)"):
        trainer.fit(model, _poisoned_loader(bad_batch=None))
    assert torch.isfinite(param).all() and not torch.equal(param, before)
    assert torch.equal(param.detach(), snaps.after[1]["reconstructor.encoder." + _name_of(model.encoder, param)])
    _assert_last_good_checkpoint(tmp_path / "ckpt" / "last.ckpt", snaps.after[1], step=6)


def _name_of(module: torch.nn.Module, param: torch.nn.Parameter) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def test_a_healthy_cgan_run_is_not_stopped(tmp_path):
    """The divergence checks do not fire on finite losses and gradients (the control)."""
    snaps = Snapshots()
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[snaps], enable_checkpointing=False)
    trainer.fit(_tiny_cgan(), _poisoned_loader(bad_batch=None))
    assert sorted(snaps.after) == [0, 1, 2, 3] and trainer.global_step == 12


# -- slow: kill -9 in the middle of an epoch, resume from last.ckpt, compare -------------------------
def _derived_config(src: Path, dst: Path, data_root: Path, trainer: dict, data: dict, checkpoint: dict | None = None) -> Path:
    """``src`` with a CSV logger only, ``trainer`` / ``data`` settings merged in, and (optionally)
    the first ModelCheckpoint's settings replaced by ``checkpoint``."""
    cfg = yaml.safe_load(src.read_text())
    cfg["trainer"].update({"accelerator": "cpu", **trainer})
    cfg["trainer"]["logger"] = [  # one logger: replaces experiments/common/loggers.yaml's CSV + W&B pair
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": cfg["trainer"]["default_root_dir"], "name": "csv"}}]
    if checkpoint is not None:
        first = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        first["init_args"].update(checkpoint)
    cfg["data"]["init_args"].update({"data_root": str(data_root.resolve()), **data})
    dst.write_text(yaml.safe_dump(cfg))
    return dst


def _fit_cmd(config: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).with_name("mixdefense")), "fit", *COMMON, "--config", str(config), *extra]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}  # see the one_thread fixture


def _run(cmd: list[str], cwd: Path, timeout: float = 240) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _progress(log: Path) -> tuple[int, int]:
    """``(epoch, percent)`` of the last training progress line a run printed (``(-1, 0)``: none yet)."""
    import re

    found = re.findall(r"Epoch (\d+):\s+(\d+)%", log.read_text(errors="replace")) if log.exists() else []
    return (int(found[-1][0]), int(found[-1][1])) if found else (-1, 0)


def _start_and_kill(cmd: list[str], cwd: Path, last: Path, ready: Callable[[dict], bool], epoch: int,
                    timeout: float = 240) -> dict:
    """Start ``cmd``, wait until ``last`` exists with ``ready(its checkpoint)`` and the progress bar
    shows ``epoch`` at least 20 % done, then SIGKILL the run: in the middle of ``epoch``.
    Returns the checkpoint it left (loaded ``weights_only``)."""
    log_path = cwd / "killed.log"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ONE_THREAD)
    deadline = time.monotonic() + timeout
    checkpointed = False
    try:
        while True:
            assert proc.poll() is None, f"the run ended before it was killed:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint / progress in time"
            if not checkpointed and last.exists():
                try:
                    checkpointed = ready(torch.load(last, weights_only=True, map_location="cpu"))
                except (RuntimeError, EOFError):  # being written (atomic rename: rare)
                    pass
            if checkpointed and _progress(log_path)[0] == epoch and _progress(log_path)[1] >= 20:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return torch.load(last, weights_only=True, map_location="cpu")


def _first_logged(run: Path) -> tuple[int, int]:
    """``(epoch, step)`` of the first training row of the newest CSV log (the resumed run's): a run
    that resumed starts where its checkpoint left off, not at ``(0, 0)``."""
    newest = max(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = [r for r in csv.DictReader(newest.open()) if r.get("epoch") not in ("", None)]
    assert rows, newest.read_text()[:1000]
    return int(rows[0]["epoch"]), int(rows[0]["step"])


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]


def _last_metrics(run: Path) -> dict[str, float]:
    """The last logged value of every metric in the run's CSV logs (all versions: a resumed run
    writes a new one)."""
    out: dict[str, float] = {}
    for path in sorted(run.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime):
        for row in csv.DictReader(path.open()):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return out


@pytest.mark.slow
def test_classifier_killed_mid_epoch_resumes_to_the_same_weights(data_root, tmp_path):
    """LeNet on 2,000 MNIST images, 2 epochs (``last.ckpt`` at every epoch end).  Run B is killed
    with SIGKILL in the middle of epoch 1 and resumed from ``last.ckpt`` (end of epoch 0); it must
    end with the same weights and validation metrics as the uninterrupted run A (same seed): the
    checkpoint carries the random generators' states (:class:`lightning_modules.callbacks.ResumableRNG`)."""
    config = _derived_config(CLASSIFIER_CFG, tmp_path / "classifier.yaml", data_root,
                             trainer={"max_epochs": 2, "enable_progress_bar": True, "log_every_n_steps": 10},
                             data={"train_subset": 2000, "batch_size": 32})
    ckpt = Path("checkpoints/mnist/classifier/last.ckpt")
    (a := tmp_path / "a").mkdir()
    (b := tmp_path / "b").mkdir()
    _run(_fit_cmd(config), a)
    left = _start_and_kill(_fit_cmd(config), b, b / ckpt, ready=lambda c: c["epoch"] >= 0, epoch=1)
    epoch, percent = _progress(b / "killed.log")
    assert left["epoch"] == 0 and epoch == 1 and 0 < percent < 100, (left["epoch"], epoch, percent)  # mid-epoch 1
    _run(_fit_cmd(config, "--ckpt_path", str(ckpt)), b)
    assert _first_logged(b / "runs")[0] == 1  # it resumed in epoch 1 (a fresh start would also match A)
    sa, sb = _state(a / ckpt), _state(b / ckpt)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ma, mb = _last_metrics(a / "runs"), _last_metrics(b / "runs")
    assert ma["val/acc"] == mb["val/acc"] > 0.8 and ma["val/loss"] == mb["val/loss"]


@pytest.mark.slow
def test_cgan_killed_mid_epoch_resumes_from_a_mid_epoch_checkpoint(data_root, tmp_path):
    """The revised cGAN (Algorithm 1, three optimizers; narrow widths so that it fits the time of a
    test on a shared 2-core CPU) on 534 MNIST images: 2 epochs of 30 batches, ``last.ckpt`` every
    10 batches (30 optimizer steps).  Run B is killed with SIGKILL in the middle of epoch 1, after
    its checkpoint at batch 40; resumed from it, it must finish with the same number of steps as
    the uninterrupted run A, finite weights, and the same validation SSIM and label binding
    within noise (the rest of the interrupted epoch is reshuffled: a plain DataLoader cannot
    resume mid-epoch)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    config = _derived_config(REPO / "experiments/mnist/cgan.yaml", tmp_path / "cgan.yaml", data_root,
                             trainer={"max_epochs": 2, "val_check_interval": 1.0, "limit_val_batches": 2,
                                      "log_every_n_steps": 4, "enable_progress_bar": True},
                             data={"train_subset": 534, "batch_size": 16},
                             checkpoint={"every_n_train_steps": 30})
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init_args"].update({"binding_classifier": str(REPO / "artifacts/mnist/classifier.pt"),
                                      "enc_channels": [8, 16, 32], "gen_channels": [16, 16, 8, 8],
                                      "dis_channels": [8, 8, 8, 8], "latent_dim": 8})
    config.write_text(yaml.safe_dump(cfg))
    ckpt = Path("checkpoints/mnist/cgan/last.ckpt")
    _run(_fit_cmd(config), a)
    left = _start_and_kill(_fit_cmd(config), b, b / ckpt, ready=lambda c: c["global_step"] >= 3 * 40, epoch=1)
    epoch, percent = _progress(b / "killed.log")
    assert left["global_step"] == 3 * 40 and left["epoch"] == 1, (left["global_step"], left["epoch"])
    assert epoch == 1 and 0 < percent < 100, (epoch, percent)  # killed in the middle of epoch 1
    _run(_fit_cmd(config, "--ckpt_path", str(ckpt)), b)
    epoch, step = _first_logged(b / "runs")
    assert epoch == 1 and step >= 40, (epoch, step)  # continued after batch 40, not from scratch
    ca, cb = (torch.load(r / ckpt, weights_only=True, map_location="cpu") for r in (a, b))
    assert ca["global_step"] == cb["global_step"] == 3 * 60 and ca["epoch"] == cb["epoch"]
    assert all(torch.isfinite(v).all() for v in cb["state_dict"].values() if v.is_floating_point())
    ma, mb = _last_metrics(a / "runs"), _last_metrics(b / "runs")
    print(f"\nuninterrupted: {ma}\nresumed:       {mb}")
    assert abs(ma["val/ssim"] - mb["val/ssim"]) < 0.05, (ma["val/ssim"], mb["val/ssim"])
    # ... and "within noise" is tighter than what the resumed epoch itself changed
    first = next(r for r in csv.DictReader(next((a / "runs").rglob("metrics.csv")).open()) if r["val/ssim"])
    assert abs(ma["val/ssim"] - mb["val/ssim"]) < 0.5 * abs(ma["val/ssim"] - float(first["val/ssim"]))
    assert abs(ma["val/binding"] - mb["val/binding"]) < 0.15, (ma["val/binding"], mb["val/binding"])

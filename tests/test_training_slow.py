"""Slow: a real (short) training run through the CLI, checkpoint, export and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixdefense.classifiers import load_classifier
from mixdefense.cli import main

REPO = Path(__file__).resolve().parents[1]

# Every Lightning stage composes with the shared blocks first (the header of each experiments/<ds>/<stage>.yaml).
COMMON = ["--config", str(REPO / "experiments/common/trainer.yaml"), "--config", str(REPO / "experiments/common/loggers.yaml")]


@pytest.mark.slow
def test_mnist_lenet_trains_exports_and_reloads(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/, checkpoints/ and artifacts/ land in tmp_path
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = str(REPO / "experiments/mnist/classifier.yaml")
    common = [f"--data.init_args.data_root={data_root.resolve()}", "--data.init_args.train_subset=12000",
              "--trainer.accelerator=cpu", "--trainer.max_epochs=1"]
    assert main(["fit", *COMMON, "--config", cfg, *common]) == 0
    assert (tmp_path / "checkpoints/mnist/classifier/best.ckpt").exists()
    assert main(["test", *COMMON, "--config", cfg, *common, "--ckpt_path", "checkpoints/mnist/classifier/best.ckpt"]) == 0
    summary = json.loads((tmp_path / "artifacts/candidates/mnist/classifier.json").read_text())
    assert summary["test"]["metrics"]["test/acc"] > 0.95
    model = load_classifier(tmp_path / "artifacts/candidates/mnist/classifier.pt")
    from datamodules import MNISTDataModule

    dm = MNISTDataModule(data_root=str(data_root), test_subset=1000)
    dm.setup("test")
    x, y = dm.data_test.images.float() / 255, dm.data_test.labels
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95

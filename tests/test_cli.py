"""The one entry point: LightningCLI `fit` on each dataset (fast_dev_run), help, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mixdefense.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
def test_fit_fast_dev_run_on_each_dataset(data_root, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write runs/ and checkpoints/ relative to the working dir
    config = REPO / "experiments" / dataset / "classifier.yaml"
    code = main([
        "fit", "--config", str(config),
        "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu",
        f"--data.init_args.data_root={data_root.resolve()}", "--data.init_args.batch_size=16",
    ])
    assert code == 0
    assert not (tmp_path / "artifacts").exists()  # fast_dev_run exports nothing


def test_every_dataset_has_cpu_and_paper_profiles():
    for dataset in ("mnist", "cifar10", "gtsrb"):
        for name in ("classifier.yaml", "classifier_paper.yaml"):
            assert (REPO / "experiments" / dataset / name).is_file()


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "fit, validate, test, predict" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_unknown_config_key_is_one_clear_error_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mixdefense.cli", "fit", "--config", str(REPO / "experiments/mnist/classifier.yaml"),
         "--model.init_args.learning_rat=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr
    assert "Epoch" not in proc.stderr + proc.stdout

"""The one entry point: LightningCLI `fit` on each dataset (fast_dev_run), help, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixdefense.cli import main

REPO = Path(__file__).resolve().parents[1]

# Every Lightning stage composes with the shared blocks first (the header of each experiments/<ds>/<stage>.yaml).
COMMON = ["--config", str(REPO / "experiments/common/trainer.yaml"), "--config", str(REPO / "experiments/common/loggers.yaml")]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
def test_fit_fast_dev_run_on_each_dataset(data_root, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write runs/ and checkpoints/ relative to the working dir
    config = REPO / "experiments" / dataset / "classifier.yaml"
    code = main([
        "fit", *COMMON, "--config", str(config),
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
        [sys.executable, "-m", "mixdefense.cli", "fit", *COMMON, "--config", str(REPO / "experiments/mnist/classifier.yaml"),
         "--model.init_args.learning_rat=0.1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr
    assert "Epoch" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
def test_cgan_fast_dev_run_on_each_dataset(data_root, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main([
        "fit", *COMMON, "--config", str(REPO / "experiments" / dataset / "cgan.yaml"),
        "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", "--trainer.logger=false",
        f"--model.init_args.binding_classifier={REPO / 'artifacts' / dataset / 'classifier.pt'}",
        f"--data.init_args.data_root={data_root.resolve()}", "--data.init_args.batch_size=8",
    ])
    assert code == 0
    assert not (tmp_path / "artifacts").exists()  # fast_dev_run exports nothing


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
def test_cgan_paper_profiles_parse(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *COMMON, "--config", str(REPO / "experiments" / dataset / "cgan_paper.yaml"), "--print_config"])
    assert stop.value.code == 0
    assert "latent_dim: 128" in capsys.readouterr().out


def _fit_two_batches(config: str, data_root: Path) -> int:
    """``mixdefense fit`` of a repository config on two batches of 8 images and one validation batch."""
    return main([
        "fit", *COMMON, "--config", str(REPO / config), "--trainer.accelerator=cpu",
        "--trainer.logger=false", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.val_check_interval=1.0", "--trainer.max_epochs=1",
        f"--data.init_args.data_root={data_root.resolve()}", "--data.init_args.batch_size=8",
        "--data.init_args.train_subset=200",
    ])


def test_cgan_trains_exports_and_evaluates_end_to_end(data_root, tmp_path, monkeypatch, capsys):
    """A two-batch fit writes the plain-weights cGAN; `mixdefense cgan evaluate` reads it and reports."""
    import json

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts/mnist").mkdir(parents=True)
    (tmp_path / "artifacts/mnist/classifier.pt").write_bytes((REPO / "artifacts/mnist/classifier.pt").read_bytes())
    assert _fit_two_batches("experiments/mnist/cgan.yaml", data_root) == 0
    record = json.loads((tmp_path / "artifacts/candidates/mnist/cgan.json").read_text())
    assert record["global_step"] == 2 * 3 and record["config"]["latent_dim"] == 16  # 3 optimizer steps per batch
    assert record["source_checkpoint"].endswith("best.ckpt") and "val/select" in record["best"]  # the best by SSIM × binding
    # what it trained on, in the json and in the weights file (calibrating on val_groups checks it)
    data = {"dataset": "mnist", "val_fraction": 0.1, "seed": 0, "val_grouping": "random", "train_subset": 200}
    assert record["data"] == data
    assert torch.load(tmp_path / "artifacts/candidates/mnist/cgan.pt", weights_only=True)["data"] == data
    assert list((tmp_path / "runs/mnist/cgan").rglob("grids/step*.png"))  # the Figure-8 grid of the validation
    monkeypatch.setenv("MIXDEFENSE_DATA", str(data_root.resolve()))
    assert main(["cgan", "evaluate", "--dataset", "mnist", "--weights", "artifacts/candidates/mnist/cgan.pt",
                 "--num-images", "20"]) == 0
    report = json.loads((tmp_path / "results/mnist/cgan/cgan_eval.json").read_text())
    assert report["num_images"] == 20 and 0 <= report["binding"] <= 1 and -1 <= report["ssim_mean"] <= 1
    assert (tmp_path / "results/mnist/cgan/figure8.png").is_file()
    assert "label binding" in capsys.readouterr().out


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
@pytest.mark.parametrize("profile", ["metric.yaml", "metric_paper.yaml"])
def test_metric_profiles_parse(dataset, profile, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", *COMMON, "--config", str(REPO / "experiments" / dataset / profile), "--print_config"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "MetricModule" in out and ("mobilenet_v2" in out) == (profile == "metric_paper.yaml")


def test_contranet_evaluate_measures_on_the_split_asked_for(tmp_path):
    """``--split selection``: the label AUROC and the attacks read the selection split's images, and the
    report says so (thresholds still from the calibration split)."""
    import argparse

    from mixdefense.commands.contranet import evaluate, markdown_table

    asked = []

    def load_images(ds, split, n):
        asked.append(split)
        g = torch.Generator().manual_seed(1)
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)

    def load_calibration(ds, split, n):
        x, y = load_images(ds, "val", n)
        return x, y, {"split": split}

    args = argparse.Namespace(dataset="mnist", cgan=str(REPO / "artifacts/mnist/cgan.pt"),
                              metric=str(REPO / "artifacts/mnist/metric.pt"),
                              classifier=str(REPO / "artifacts/mnist/classifier.pt"), bundle=str(tmp_path / "c.pt"),
                              target_frr=0.05, calibration_images=20, calibration_split="val", num_images=12,
                              wrong_labels=1, eps=[8.0], attacks=["fgsm"], unbudgeted_images=4, min_successes=1,
                              batch_size=50, out=str(tmp_path / "out"), split="selection")
    result = evaluate(args, load_images, load_calibration)
    assert asked == ["val", "selection"] and result["split"] == "selection"
    table = markdown_table(result)
    assert "12 selection images" in table and "test images" not in table


def test_contranet_and_adaptive_take_the_calibration_split_from_the_operating_point_file(tmp_path):
    """``--config`` names the operating point whose ``calibration_split`` the tools default to: a
    ``val_groups`` file makes ``contranet evaluate`` check the shipped MNIST parts (trained on the random
    split) and refuse before any image is loaded; ``adaptive`` takes the split; ``--calibration-split`` wins."""
    import argparse

    from mixdefense.commands import Data
    from mixdefense.commands import adaptive
    from mixdefense.commands.contranet import evaluate

    def never(*_, **__):
        raise AssertionError("no image may be loaded")

    config = tmp_path / "detector.yaml"
    config.write_text("calibration_split: val_groups\n")
    args = argparse.Namespace(dataset="mnist", cgan=None, metric=None, classifier=None, calibration_split=None,
                              config=str(config))
    with pytest.raises(ValueError, match="val_groups.*cGAN"):
        evaluate(args, never, never)
    data = Data(["mnist"], never, never)
    assert adaptive.parse_args(["--dataset", "mnist", "--config", str(config)], data).calibration_split == "val_groups"
    assert adaptive.parse_args(["--dataset", "mnist"], data).calibration_split == "val"
    assert adaptive.parse_args(["--dataset", "mnist", "--config", str(config), "--calibration-split", "val"],
                               data).calibration_split == "val"


def test_calibration_on_held_out_groups_refuses_parts_trained_on_them(tmp_path):
    """``val_groups`` thresholds need parts trained with ``val_grouping="groups"``: a part without that record
    (the shipped MNIST cGAN) or trained on the random split is refused by name; a part trained so passes."""
    from mixdefense.io import check_calibration_held_out

    shipped = REPO / "artifacts/mnist/cgan.pt"
    with pytest.raises(ValueError, match=r"val_grouping groups.*cGAN .*not recorded"):
        check_calibration_held_out("val_groups", {"cGAN": shipped})
    payload = torch.load(shipped, weights_only=True)
    for grouping, ok in (("random", False), ("groups", True)):
        part = tmp_path / f"{grouping}.pt"
        torch.save({**payload, "data": {"val_grouping": grouping}}, part)
        if ok:
            check_calibration_held_out("val_groups", {"cGAN": part})
        else:
            with pytest.raises(ValueError, match="val_grouping: random"):
                check_calibration_held_out("val_groups", {"cGAN": part})
    check_calibration_held_out("val", {"cGAN": shipped})  # the random split: nothing to check


def test_a_calibrated_contranet_carries_its_parts_training_record(tmp_path):
    """``contranet evaluate`` writes its cGAN's and M's ``data`` into the ContraNet file, so that ``mixdefense
    bundle`` can refuse a ``val_groups`` calibration; parts that disagree never pass."""
    from mixdefense.commands.contranet import joint_training_data
    from mixdefense.io import check_calibration_held_out, training_data
    from mixdefense.layers.contranet import ContraNet

    files = {}
    for name in ("cgan", "metric"):
        payload = torch.load(REPO / f"artifacts/mnist/{name}.pt", weights_only=True)
        for grouping in ("groups", "random"):
            files[name, grouping] = tmp_path / f"{name}_{grouping}.pt"
            torch.save({**payload, "data": {"dataset": "mnist", "val_grouping": grouping}}, files[name, grouping])
    contranet = ContraNet.load(REPO / "artifacts/mnist/contranet.pt")
    for cgan, metric, ok in (("groups", "groups", True), ("groups", "random", False), ("random", "random", False)):
        out = contranet.save(tmp_path / "c.pt", data=joint_training_data(files["cgan", cgan], files["metric", metric]))
        assert training_data(out)["metric"]["val_grouping"] == metric
        if ok:
            check_calibration_held_out("val_groups", {"ContraNet": out})
        else:
            with pytest.raises(ValueError, match="ContraNet"):
                check_calibration_held_out("val_groups", {"ContraNet": out})


def test_metric_trains_exports_and_contranet_evaluates_end_to_end(data_root, tmp_path, monkeypatch, capsys):
    """Two batches of triplet training write M; `mixdefense contranet evaluate` calibrates, saves and attacks."""
    import json

    from mixdefense.layers.contranet import ContraNet

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts/mnist").mkdir(parents=True)
    for name in ("classifier.pt", "cgan.pt"):
        (tmp_path / "artifacts/mnist" / name).write_bytes((REPO / "artifacts/mnist" / name).read_bytes())
    assert _fit_two_batches("experiments/mnist/metric.yaml", data_root) == 0
    record = json.loads((tmp_path / "artifacts/candidates/mnist/metric.json").read_text())
    assert record["config"]["embedding_dim"] == 12 and "val/auroc" in record["best"]
    monkeypatch.setenv("MIXDEFENSE_DATA", str(data_root.resolve()))
    assert main(["contranet", "evaluate", "--dataset", "mnist", "--metric", "artifacts/candidates/mnist/metric.pt",
                 "--num-images", "40", "--calibration-images", "40",
                 "--eps", "8", "--attacks", "fgsm", "--min-successes", "1", "--wrong-labels", "1"]) == 0
    report = json.loads((tmp_path / "results/mnist/contranet/contranet_eval.json").read_text())
    assert set(report["label_auroc"]) == set(report["label_auroc_confusable"]) == {"metric", "l2", "ssim", "metric+ssim"}
    assert all(c["achieved_frr"] <= 0.05 for c in report["calibration"].values())
    assert {r["defense"] for r in report["attacks"]} == set(report["label_auroc"])
    assert (tmp_path / "results/mnist/contranet/label_scores.png").is_file()
    detector = ContraNet.load(tmp_path / "artifacts/candidates/mnist/contranet.pt")
    assert detector.calibrated and detector.scores == ("metric",)
    assert "Label AUROC" in capsys.readouterr().out


def _mnist_parts(tmp_path, data_root, monkeypatch):
    """A working folder holding a copy of the shipped MNIST parts (``tmp_path/parts``), data from ``data_root``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MIXDEFENSE_DATA", str(data_root.resolve()))
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("classifier.pt", "saec.pt", "contranet.pt"):
        (parts / name).write_bytes((REPO / "artifacts/mnist" / name).read_bytes())
    return parts


def test_bundle_command_assembles_and_checks_the_detector(data_root, tmp_path, monkeypatch, capsys):
    """The bundle is calibrated at the operating point of --config, records its parts' hashes, and goes
    to artifacts/candidates/<ds>/ unless --out says otherwise (a shipped file is never replaced by default)."""
    import json

    import mixdefense
    from mixdefense.commands.bundle import check_parts

    parts = _mnist_parts(tmp_path, data_root, monkeypatch)
    config = tmp_path / "detector.yaml"
    config.write_text("calibration_split: val\ntarget_frr: 0.02\ncalibration_images: 200\n")
    assert main(["bundle", "--dataset", "mnist", "--parts", str(parts), "--check-images", "60", "--config", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bundle"] == "artifacts/candidates/mnist/detector.pt" and not (parts / "detector.pt").exists()
    cal = report["contranet_calibration"]
    assert cal["composite_frr"] <= 0.02 and cal["achieved_frr"] <= 0.02  # SAEC and ContraNet together at 2 %
    # only the correctly classified calibration images set the threshold
    assert cal["images"] == 200 and cal["num_images"] == cal["correctly_classified"] == 200 - cal["misclassified"]
    check = report["clean_check"]
    assert check["images"] == 60 and check["accuracy_with_defense"] <= check["accuracy_classifier"]
    detector = mixdefense.load_detector(tmp_path / "artifacts/candidates/mnist/detector.pt")
    assert detector.layer_names == ["saec", "contranet"] and detector.record["clean_check"] == check
    assert check_parts(detector.record, parts) == []
    with open(parts / "saec.pt", "ab") as f:  # any change to a part is seen
        f.write(b"\0")
    assert check_parts(detector.record, parts) == ["saec.pt"]


def test_bundle_turns_on_contranets_runner_up_contrast_and_calibrates_that_score(data_root, tmp_path, monkeypatch, capsys):
    """--contrast-labels/--contrast-weight change ContraNet's score in the bundle (recorded), its threshold is set
    on that score, and keeping the part's thresholds for another score is refused."""
    import json

    import mixdefense
    from mixdefense.cli import load_images

    parts = _mnist_parts(tmp_path, data_root, monkeypatch)
    config = tmp_path / "detector.yaml"
    config.write_text("calibration_split: val\ntarget_frr: 0.05\ncalibration_images: 120\n")
    assert main(["bundle", "--dataset", "mnist", "--parts", str(parts), "--check-images", "0", "--config", str(config),
                 "--contrast-labels", "2", "--contrast-weight", "0.5", "--out", "plus.pt"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["contranet_contrast"] == {"labels": 2, "weight": 0.5}
    detector = mixdefense.load_detector(tmp_path / "plus.pt")
    contranet = detector.layers[-1]
    assert (contranet.contrast_labels, contranet.contrast_weight) == (2, 0.5)
    paper = mixdefense.load_detector(REPO / "artifacts/mnist/detector.pt").layers[-1]
    assert contranet.thresholds.item() != paper.thresholds.item()  # recalibrated on the contrast score
    x, _ = load_images("mnist", "val", 120)  # the calibration images: the bundle rejects about 5 % of them
    assert detector.detect(x).rejected.float().mean().item() <= 0.1
    with pytest.raises(ValueError, match="keep-thresholds"):
        main(["bundle", "--dataset", "mnist", "--parts", str(parts), "--check-images", "0", "--keep-thresholds",
              "--contrast-labels", "3", "--out", "kept.pt"])


def test_operating_point_config_is_checked(tmp_path):
    from mixdefense.commands import operating_point

    assert operating_point("nowhere")["source"] == "defaults"
    bad = tmp_path / "detector.yaml"
    bad.write_text("target_frr: 1.5\n")
    with pytest.raises(ValueError, match="target_frr"):
        operating_point("mnist", bad)
    bad.write_text("report_frrs: [0.01, 2]\n")
    with pytest.raises(ValueError, match="report_frrs"):
        operating_point("mnist", bad)
    bad.write_text("contranet_frr: 0.01\n")  # the old per-layer key: every detector now shares target_frr
    with pytest.raises(ValueError, match="unknown keys"):
        operating_point("mnist", bad)
    assert operating_point("gtsrb", REPO / "experiments/gtsrb/detector.yaml")["calibration_split"] == "val"
    bad.write_text("calibration_split: holdout\n")  # the old last-2,000-test-images hold-out is gone
    with pytest.raises(ValueError, match="calibration_split"):
        operating_point("mnist", bad)


def test_baselines_refuse_a_magnet_autoencoder_trained_on_the_held_out_groups(tmp_path):
    """``baselines calibrate`` on ``val_groups``: the shipped GTSRB autoencoder (trained on the random split,
    no record) is refused before MagNet is calibrated; Feature Squeezing, which trains nothing, is calibrated."""
    from mixdefense.commands import Data
    from mixdefense.commands.baselines import calibrate_baselines

    from mixdefense.classifiers import load_classifier

    classifier = load_classifier(REPO / "artifacts/gtsrb/classifier.pt")

    def load_images(ds, split, n=None, **_):  # noise labelled as the classifier sees it: all "correctly classified"
        x = torch.rand(n or 8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return x, classifier(x).argmax(1)

    def load_calibration(ds, split, n):
        return (*load_images(ds, split, n), {"split": split})

    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("classifier.pt", "magnet_ae.pt"):
        (parts / name).symlink_to(REPO / "artifacts/gtsrb" / name)
    data = Data(datasets=["gtsrb"], load_images=load_images, load_calibration=load_calibration)
    with pytest.raises(ValueError, match="MagNet's autoencoder .*not recorded"):
        calibrate_baselines("gtsrb", parts, data, 0.1, 12, 4, "val_groups", tmp_path / "out")
    assert (tmp_path / "out/feature_squeezing.pt").is_file() and not (tmp_path / "out/magnet.pt").exists()


def test_bundle_refuses_val_groups_thresholds_for_a_contranet_trained_on_them(tmp_path):
    """``mixdefense bundle`` with ``calibration_split: val_groups``: the shipped MNIST ContraNet records no
    held-out groups, so the bundle stops before loading a calibration image."""
    from mixdefense.commands import Data
    from mixdefense.commands.bundle import build

    def never(*_, **__):
        raise AssertionError("no image may be loaded")

    config = tmp_path / "detector.yaml"
    config.write_text("calibration_split: val_groups\n")
    with pytest.raises(ValueError, match="val_groups.*ContraNet"):
        build("mnist", Data(["mnist"], never, never), REPO / "artifacts/mnist", tmp_path / "d.pt", False, 0, str(config))

"""The composite evaluation (`mixdefense test --config experiments/<ds>/evaluate*.yaml`): rows → metrics, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_modules.evaluation import _points
from mixdefense.classifiers import load_classifier
from mixdefense.cli import load_images, main
from mixdefense.evaluation.sweep import summarize
from mixdefense.layers.contranet import ContraNet
from mixdefense.layers.saec import SAEC
from mixdefense.nets import EmbeddingNet, Reconstructor
from mixdefense.pipeline import MixDefense, save_bundle

REPO = Path(__file__).resolve().parents[1]

# Every Lightning stage composes with the shared blocks first (the header of each experiments/<ds>/<stage>.yaml).
COMMON = ["--config", str(REPO / "experiments/common/trainer.yaml"), "--config", str(REPO / "experiments/common/loggers.yaml")]
ATTACKS = "{fgsm: {budgets: [8, 64]}, cw: {bins: {l2: [1.0, 3.0]}, steps: 10}}"


def test_points_and_budget_units():
    pts = _points({"fgsm": {"budgets": [8, 2]}, "fgm": {"budgets": [0.5]}, "deepfool": {"bins": {"l2": [1.0], "linf": [8]}}})
    assert [(p["attack"], p["norm"], round(p["eps"], 6)) for p in pts] == [
        ("fgsm", "linf", round(2 / 255, 6)), ("fgsm", "linf", round(8 / 255, 6)), ("fgm", "l2", 0.5),
        ("deepfool", "l2", 1.0), ("deepfool", "linf", round(8 / 255, 6))]
    with pytest.raises(ValueError, match="bins"):
        _points({"cw": {"budgets": [1.0]}})
    with pytest.raises(ValueError, match="budgets"):
        _points({"fgsm": {}})


def test_summary_formulas_on_hand_made_rows():
    """Two layers; 4 AEs at one point: the metrics equal eqs. 7–8 computed by hand."""
    points = [{"attack": "fgsm", "norm": "linf", "eps": 0.1, "minimum_norm": False}]
    #            point success correct norm  adv margins (a, b)  clean margins (a, b)
    ae = torch.tensor([[0, 1, 0, .1, 2.0, 0.5, 0.1, 0.2],   # caught by a, clean accepted
                       [0, 1, 0, .1, 0.5, 3.0, 0.1, 0.2],   # caught by b
                       [0, 1, 0, .1, 0.5, 0.5, 0.1, 1.5],   # missed; its clean original rejected by b
                       [0, 0, 1, .1, 0.5, 0.5, 0.1, 0.2]])  # failed AE, accepted and correct
    clean = torch.tensor([[1, 0.1, 0.2], [1, 0.1, 1.5], [0, 0.1, 0.2], [1, 2.0, 0.2]])
    out = summarize(ae, clean, points, ["a", "b"], min_successes=3)
    mix = next(r for r in out["points"] if r["defense"] == "mixdefense")
    a = next(r for r in out["points"] if r["defense"] == "a")
    assert mix["num_successful"] == 3 and mix["kept"] and mix["attack_success_rate"] == 0.75
    assert mix["detection_rate"] == pytest.approx(2 / 3) and a["detection_rate"] == pytest.approx(1 / 3)
    # eq. 7 on the 3 successful AEs and their 3 originals: TP = 2 clean accepted, TN = 2 AEs rejected
    assert mix["acc_detector"] == pytest.approx(4 / 6) and mix["clean_rejection_rate"] == pytest.approx(1 / 3)
    # eq. 8 over all 4 AEs: 2 rejected + 1 correctly classified
    assert mix["acc_rc"] == pytest.approx(3 / 4)
    assert mix["caught_by_a"] == pytest.approx(1 / 3) and mix["caught_by_b"] == pytest.approx(1 / 3)
    c = out["clean"]
    assert c["accuracy_classifier"] == 0.75 and c["accuracy_with_defense"] == 0.25
    assert c["false_rejection"] == {"a": 0.25, "b": 0.25, "mixdefense": 0.5}


@pytest.fixture(scope="module")
def mnist_bundle(tmp_path_factory, data_root):
    """The shipped LeNet and SAEC with a small untrained ContraNet whose threshold is set on clean images."""
    clf = load_classifier(REPO / "artifacts/mnist/classifier.pt")
    contranet = ContraNet(Reconstructor(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)), EmbeddingNet(1, 6, "cnn", (4, 8)))
    x, _ = load_images("mnist", "val", 200, data_root=str(data_root))
    contranet.calibrate(x, clf(x).argmax(1), 0.1)
    path = tmp_path_factory.mktemp("bundle") / "detector.pt"
    save_bundle(MixDefense(clf, [SAEC.load(REPO / "artifacts/mnist/saec.pt"), contranet]), path)
    return path


def _test_args(bundle: Path, out: Path, data_root: Path) -> list[str]:
    return ["test", *COMMON, "--config", str(REPO / "experiments/mnist/evaluate_quick.yaml"), "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--model.init_args.bundle={bundle}",
            f"--model.init_args.report_dir={out}", "--model.init_args.min_successes=1",
            f"--model.init_args.attacks={ATTACKS}", f"--data.init_args.data_root={data_root.resolve()}",
            "--data.init_args.test_subset=40", "--data.init_args.batch_size=10"]


def test_evaluation_writes_the_report_and_the_composite_catches_at_least_each_layer(mnist_bundle, tmp_path, data_root,
                                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_test_args(mnist_bundle, tmp_path / "report", data_root) + ["--model.init_args.examples=3"]) == 0
    result = json.loads((tmp_path / "report/evaluation.json").read_text())
    assert len(list((tmp_path / "report/examples/clean").glob("*.png"))) == 3
    assert "Acc_det" in capsys.readouterr().out
    assert {r["defense"] for r in result["points"]} == {"saec", "contranet", "mixdefense", "undefended"}
    assert len(result["points"]) == 4 * (2 + 2)  # 4 defenses × (2 FGSM budgets + 2 C&W bins)
    by = {(r["attack"], r["eps"], r["defense"]): r for r in result["points"]}
    for (attack, eps, d), r in by.items():
        if d == "mixdefense" and r["num_successful"]:
            assert r["detection_rate"] >= max(by[(attack, eps, "saec")]["detection_rate"],
                                              by[(attack, eps, "contranet")]["detection_rate"])
        assert r["acc_rc"] != r["acc_rc"] or 0 <= r["acc_rc"] <= 1
    assert result["clean"]["images"] == 40 and 0.9 <= result["clean"]["accuracy_classifier"] <= 1
    for name in ("points.csv", "acc_detector.png", "acc_rc.png", "detection_rate.png"):
        assert (tmp_path / "report" / name).is_file()
    assert not (tmp_path / "report/partial").exists()  # a finished run leaves no partial rows
    undefended = {(r["attack"], r["eps"]): r for r in result["points"] if r["defense"] == "undefended"}
    for r in (r for r in undefended.values() if r["num_aes"]):  # never rejects: Acc_RC = 1 − attack success
        assert r["acc_rc"] == pytest.approx(1 - r["attack_success_rate"])
        if r["num_successful"]:
            assert r["detection_rate"] == 0.0
    # AEs only from the correctly classified images, and every point counts all of them (C&W cumulatively)
    correct = round(result["clean"]["images"] * result["clean"]["accuracy_classifier"])
    assert {r["num_aes"] for r in result["points"]} == {correct}
    # every successful AE within its point's budget (a loop attacking at 2ε would put FGSM's at exactly 2ε)
    for r in result["points"]:
        if r["num_successful"]:
            assert r["mean_norm"] <= r["eps"] * (1 + 1e-5), (r["attack"], r["eps"], r["mean_norm"])
    # cumulative: an AE of norm ≤ 1 counts at 1 and at 3, so success can only grow with the budget
    assert undefended[("cw", 3.0)]["num_successful"] >= undefended[("cw", 1.0)]["num_successful"] > 0


def test_evaluation_refuses_the_bundles_calibration_holdout(mnist_bundle, tmp_path, data_root, monkeypatch):
    """A bundle calibrated on the last test images may not be evaluated on them."""
    from mixdefense.pipeline import load_detector

    monkeypatch.chdir(tmp_path)
    held = save_bundle(load_detector(mnist_bundle), tmp_path / "held.pt",
                       contranet_calibration={"split": "holdout", "test_indices": [30, 60]})
    with pytest.raises(ValueError, match="overlap the calibration hold-out"):
        main(_test_args(held, tmp_path / "report", data_root))  # the first 40 test images reach index 30


def test_baselines_on_the_same_curves(mnist_bundle, tmp_path, data_root, monkeypatch, capsys):
    """Feature Squeezing and MagNet score the bundle's AEs; a robust classifier is attacked on its own.

    The 'robust classifier' here is the bundle's own LeNet: attacked with the same deterministic
    FGSM on the same images it must give exactly the undefended classifier's Acc_RC."""
    from mixdefense.layers.magnet import MagNet, MagNetAutoencoder
    from mixdefense.layers.squeezing import FeatureSqueezing

    monkeypatch.chdir(tmp_path)
    clf = load_classifier(REPO / "artifacts/mnist/classifier.pt")
    x, _ = load_images("mnist", "val", 200, data_root=str(data_root))
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    fs.calibrate(x, 0.05)
    fs.save(tmp_path / "fs.pt")
    magnet = MagNet(MagNetAutoencoder(1), ["l1", "jsd:10"], clf)
    magnet.calibrate(x, 0.05)
    magnet.save(tmp_path / "magnet.pt")
    baselines = f"{{fs: {tmp_path / 'fs.pt'}, magnet: {tmp_path / 'magnet.pt'}, same_lenet: {REPO / 'artifacts/mnist/classifier.pt'}}}"
    args = _test_args(mnist_bundle, tmp_path / "report", data_root) + [f"--model.init_args.baselines={baselines}",
                                                                       "--model.init_args.attacks={fgsm: {budgets: [16, 64]}}"]
    assert main(args) == 0
    result = json.loads((tmp_path / "report/evaluation.json").read_text())
    assert "fs Acc_det" in capsys.readouterr().out
    by = {(r["eps"], r["defense"]): r for r in result["points"]}
    for eps in {r["eps"] for r in result["points"]}:
        assert by[(eps, "same_lenet")]["acc_rc"] == pytest.approx(by[(eps, "undefended")]["acc_rc"])
        assert by[(eps, "same_lenet")]["num_aes"] == by[(eps, "undefended")]["num_aes"]
        for d in ("fs", "magnet"):
            assert by[(eps, d)]["num_successful"] == by[(eps, "mixdefense")]["num_successful"]  # the same AEs
            assert 0 <= by[(eps, d)]["acc_rc"] <= 1
    base = result["clean"]["baselines"]
    assert base["same_lenet"]["accuracy"] == pytest.approx(result["clean"]["accuracy_classifier"])
    assert 0 <= base["fs"]["false_rejection"] <= 0.25  # calibrated at 5 % on validation images; 40 test images
    for name in ("compare_acc_detector.png", "compare_acc_rc.png", "comparison.md"):
        assert (tmp_path / "report" / name).is_file()
    assert "same_lenet Acc_det / Acc_RC" in (tmp_path / "report/comparison.md").read_text()


def test_a_killed_sweep_resumes_from_the_batches_already_done(mnist_bundle, tmp_path, data_root, monkeypatch):
    """Kill after 2 of 4 batches; the rerun computes only the 2 missing ones and ends at the same numbers."""
    from lightning_modules.evaluation import MixDefenseEvaluation

    monkeypatch.chdir(tmp_path)
    attacks = ["--model.init_args.attacks={pgd_linf: {budgets: [32, 64], steps: 3}}"]  # random start: seeds matter
    assert main(_test_args(mnist_bundle, tmp_path / "full", data_root) + attacks) == 0
    full = json.loads((tmp_path / "full/evaluation.json").read_text())

    computed = []
    original = MixDefenseEvaluation._attack_batch

    def killed_at_batch_2(self, x, y, batch_idx, rows):
        if batch_idx == 2 and not computed.count("killed"):
            computed.append("killed")
            raise KeyboardInterrupt  # Lightning's SIGTERM/Ctrl-C path: the run stops here
        computed.append(batch_idx)
        return original(self, x, y, batch_idx, rows)

    monkeypatch.setattr(MixDefenseEvaluation, "_attack_batch", killed_at_batch_2)
    out = tmp_path / "resumed"
    try:
        main(_test_args(mnist_bundle, out, data_root) + attacks)
    except (KeyboardInterrupt, SystemExit):
        pass
    assert len(list((out / "partial").glob("*.pt"))) == 2 and not (out / "evaluation.json").exists()
    computed.clear()
    computed.append("killed")  # no second kill
    assert main(_test_args(mnist_bundle, out, data_root) + attacks) == 0
    assert computed == ["killed", 2, 3]
    resumed = json.loads((out / "evaluation.json").read_text())
    assert resumed["clean"] == full["clean"]
    for a, b in zip(full["points"], resumed["points"]):
        assert a == pytest.approx(b, nan_ok=True)


def test_ddp_on_two_cpu_processes_gives_the_same_metrics(mnist_bundle, tmp_path, data_root):
    """strategy=ddp, 2 processes (gloo): every process attacks its shard, the rows are gathered."""
    runs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        args = _test_args(mnist_bundle, out, data_root) + [f"--trainer.devices={devices}"]
        if devices == 2:
            args.append("--trainer.strategy=ddp")
        proc = subprocess.run([sys.executable, "-m", "mixdefense.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[devices] = json.loads((out / "evaluation.json").read_text())
    one, two = runs[1], runs[2]
    assert one["clean"] == two["clean"]
    for a, b in zip(one["points"], two["points"]):
        for k, v in a.items():
            if isinstance(v, float):
                assert v == pytest.approx(b[k], abs=1e-6, nan_ok=True), (a["attack"], a["eps"], a["defense"], k)
            else:
                assert v == b[k]


def test_comparison_table_averages_common_budgets_and_leaves_acc_detector_of_non_rejecting_defenses_blank():
    from mixdefense.evaluation.sweep import comparison_table

    def row(defense, eps, kept, det, rc):
        return {"attack": "fgsm", "norm": "linf", "eps": eps, "minimum_norm": False, "defense": defense, "kept": kept,
                "acc_detector": det, "acc_rc": rc}

    result = {"baselines": ["fs", "madry"], "robust": ["madry"], "points": [
        row("mixdefense", 0.1, True, 0.9, 1.0), row("mixdefense", 0.2, True, 1.0, 1.0), row("mixdefense", 0.01, False, 0.5, 1.0),
        row("fs", 0.1, True, 0.7, 0.8), row("fs", 0.2, True, 0.9, 0.6), row("fs", 0.01, False, 0.5, 1.0),
        row("madry", 0.1, True, 0.5, 0.6), row("madry", 0.2, False, 0.5, 0.2), row("madry", 0.01, True, 0.5, 1.0),
        row("undefended", 0.1, True, 0.5, 0.0), row("undefended", 0.2, True, 0.5, 0.0), row("undefended", 0.01, False, 0.5, 1.0)],
        "clean": {"accuracy_with_defense": 0.98, "accuracy_classifier": 0.99,
                  "baselines": {"fs": {"accuracy": 0.95}, "madry": {"accuracy": 0.97}}}}
    line = next(ln for ln in comparison_table(result).splitlines() if ln.startswith("| fgsm"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    # composite and FS over ε 0.1 and 0.2; Madry only where both it and the composite keep the point (0.1)
    assert cells == ["95.0 / 100.0 (n=2)", "80.0 / 70.0 (n=2)", "— / 60.0 (n=1)", "— / 0.0 (n=2)"]
    assert comparison_table(result).splitlines()[-1].endswith("98.00 % | 95.00 % | 97.00 % | 99.00 % |")


def test_only_correctly_classified_images_are_attacked_and_every_point_counts_them(mnist_bundle, data_root):
    """A batch whose labels make 4 images misclassified: the AE rows come from the other images only,
    one row per image and point (the C&W point cumulatively), and rows outside C&W's budget are the
    clean image (not successful, still correct)."""
    from lightning_modules.evaluation import MixDefenseEvaluation

    module = MixDefenseEvaluation(bundle=str(mnist_bundle), attacks={
        "fgsm": {"budgets": [8]}, "cw": {"bins": {"l2": [0.05, 3.0]}, "search_steps": 3, "steps": 20}})
    module._attack_progress = lambda names, desc: names  # no trainer attached here
    x, y = load_images("mnist", "test", 12, data_root=str(data_root))
    y = y.clone()
    y[:4] = (y[:4] + 1) % 10  # these four are now misclassified by the (right) classifier
    correct = int((module.detector.classifier(x).argmax(1) == y).sum())
    assert correct <= 8
    rows = {key: [] for key in module._metrics()}
    torch.manual_seed(0)
    module._attack_batch(x, y, 1, rows)
    ae = torch.cat(rows["ae"])
    assert ae.shape[0] == 3 * correct  # 3 points × the correctly classified images, nothing else
    tiny = ae[ae[:, 0] == 1]  # C&W at L2 ≤ 0.05: no MNIST AE is that small
    assert (tiny[:, 1] == 0).all() and (tiny[:, 2] == 1).all() and (tiny[:, 3] == 0).all()
    large = ae[ae[:, 0] == 2]
    assert large[:, 1].sum() > 0 and (large[large[:, 1] == 1, 3] <= 3.0).all()

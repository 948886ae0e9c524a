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
    """Two layers; 4 AEs at one point; a fixed clean set of 3 correctly classified images (+1 misclassified):
    the metrics equal eqs. 7–8 computed by hand, at the files' thresholds and at explicit cut-offs."""
    points = [{"attack": "fgsm", "norm": "linf", "eps": 0.1, "minimum_norm": False}]
    #            point success correct norm  adv margins (a, b)
    ae = torch.tensor([[0, 1, 0, .1, 2.0, 0.5],   # caught by a
                       [0, 1, 0, .1, 0.5, 3.0],   # caught by b
                       [0, 1, 0, .1, 0.5, 0.5],   # missed
                       [0, 0, 1, .1, 0.5, 0.5]])  # failed AE, accepted and correct
    #                     correct, clean margins (a, b)
    clean = torch.tensor([[1, 0.1, 0.2], [1, 0.1, 1.5], [0, 0.1, 2.5], [1, 2.0, 0.2]])
    out = summarize(ae, clean, points, ["a", "b"], min_successes=3)
    mix = next(r for r in out["points"] if r["defense"] == "mixdefense")
    a = next(r for r in out["points"] if r["defense"] == "a")
    assert mix["num_successful"] == 3 and mix["kept"] and mix["attack_success_rate"] == 0.75 and mix["frr_target"] is None
    assert mix["detection_rate"] == pytest.approx(2 / 3) and a["detection_rate"] == pytest.approx(1 / 3)
    # the clean half is the fixed clean set (the 3 correctly classified images): the composite rejects 2 of them
    assert mix["clean_rejection_rate"] == pytest.approx(2 / 3) and a["clean_rejection_rate"] == pytest.approx(1 / 3)
    assert mix["acc_detector"] == pytest.approx((1 / 3 + 2 / 3) / 2) and a["acc_detector"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # eq. 8 over all 4 AEs: 2 rejected + 1 correctly classified
    assert mix["acc_rc"] == pytest.approx(3 / 4)
    assert mix["caught_by_a"] == pytest.approx(1 / 3) and mix["caught_by_b"] == pytest.approx(1 / 3)
    op = out["clean"]["operating_points"]["None"]
    assert out["clean"]["accuracy_classifier"] == 0.75 and op["mixdefense"]["accuracy"] == 0.25
    assert {d: op[d]["false_rejection"] for d in ("a", "b", "mixdefense")} == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "mixdefense": 2 / 3})
    # the misclassified clean image that b rejects is a catch, counted apart
    assert op["b"]["misclassified_rejected"] == 1 and op["a"]["misclassified_rejected"] == 0
    assert op["mixdefense"]["misclassified"] == 1 and op["mixdefense"]["misclassified_rejected"] == 1

    # explicit cut-offs: a alone at 3 (rejects nothing), the composite keeps a at 1 and b at 4
    cuts = {0.05: {"a": torch.tensor([3.0]), "b": torch.tensor([1.0]), "mixdefense": torch.tensor([1.0, 4.0])}}
    out = summarize(ae, clean, points, ["a", "b"], min_successes=3, cutoffs=cuts)
    by = {r["defense"]: r for r in out["points"]}
    assert by["a"]["detection_rate"] == 0 and by["a"]["clean_rejection_rate"] == 0 and by["a"]["frr_target"] == 0.05
    assert by["mixdefense"]["detection_rate"] == pytest.approx(1 / 3)  # only a's catch (b's 3.0 < 4)
    assert by["mixdefense"]["clean_rejection_rate"] == pytest.approx(1 / 3)  # only the image a rejects


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
            "--model.init_args.calibration_images=300",
            "--data.init_args.test_subset=40", "--data.init_args.batch_size=10"]


def test_evaluation_writes_the_report_at_every_operating_point(mnist_bundle, tmp_path, data_root,
                                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(_test_args(mnist_bundle, tmp_path / "report", data_root) + ["--model.init_args.examples=3"]) == 0
    result = json.loads((tmp_path / "report/evaluation.json").read_text())
    assert len(list((tmp_path / "report/examples/clean").glob("*.png"))) == 3
    assert "Acc_det" in capsys.readouterr().out
    assert {r["defense"] for r in result["points"]} == {"saec", "contranet", "mixdefense", "undefended"}
    assert result["operating_points"] == [0.01, 0.05]
    assert len(result["points"]) == 2 * 4 * (2 + 2)  # 2 operating points × 4 defenses × (2 FGSM budgets + 2 C&W bins)
    by = {(r["attack"], r["eps"], r["defense"]): r for r in result["points"] if r["frr_target"] == 0.05}
    for (attack, eps, d), r in by.items():
        if d == "mixdefense" and r["num_successful"]:  # every caught AE was caught by exactly one first layer
            assert r["detection_rate"] == pytest.approx(r["caught_by_saec"] + r["caught_by_contranet"])
        assert r["acc_rc"] != r["acc_rc"] or 0 <= r["acc_rc"] <= 1
    assert result["clean"]["images"] == 40 and 0.9 <= result["clean"]["accuracy_classifier"] <= 1
    # the composite keeps SAEC at its deployed threshold and gives ContraNet the rest of the budget
    assert all(cuts["mixdefense"][0] == 1.0 for cuts in result["calibration"]["cutoffs"].values())
    assert result["test_images"]["split"] == "test" and result["test_images"]["count"] == 40
    for name in ("points.csv", "acc_detector_frr1.png", "acc_rc_frr5.png", "detection_rate_frr5.png"):
        assert (tmp_path / "report" / name).is_file()
    assert not (tmp_path / "report/partial").exists()  # a finished run leaves no partial rows
    undefended = {(r["attack"], r["eps"]): r for r in result["points"] if r["defense"] == "undefended" and r["frr_target"] == 0.01}
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


def test_evaluation_refuses_the_bundles_calibration_images(mnist_bundle, tmp_path, data_root, monkeypatch):
    """A bundle calibrated on some test images may not be evaluated on them."""
    from mixdefense.pipeline import load_detector

    monkeypatch.chdir(tmp_path)
    held = save_bundle(load_detector(mnist_bundle), tmp_path / "held.pt",
                       contranet_calibration={"split": "test_calibration", "test_indices": [30, 31, 5000]})
    with pytest.raises(ValueError, match="were calibration images"):
        main(_test_args(held, tmp_path / "report", data_root))  # the first 40 test images hold 30 and 31


def test_the_evaluations_cutoffs_hold_their_rate_and_ignore_misclassified_images(mnist_bundle, data_root):
    """Cut-offs from correctly classified calibration images: misclassified calibration images move no
    cut-off, and on fresh clean images of the same distribution (validation images the calibration did not
    see) no detector rejects more than its rate beyond the 95 % interval, and continuous scores reach it."""
    from lightning_modules.evaluation import MixDefenseEvaluation
    from mixdefense.metrics import wilson_interval

    module = MixDefenseEvaluation(bundle=str(mnist_bundle), attacks={"fgsm": {"budgets": [8]}})
    x_all, y_all = load_images("mnist", "val", 4000, data_root=str(data_root))
    x, y, xt, yt = x_all[:1500], y_all[:1500], x_all[1500:], y_all[1500:]
    module.set_cutoffs(x, y)
    base = {f: {d: c.clone() for d, c in cuts.items()} for f, cuts in module.cutoffs.items()}
    # 300 extra images labelled wrongly: misclassified by construction, they must not move anything
    module.set_cutoffs(torch.cat([x, x[:300]]), torch.cat([y, (y[:300] + 1) % 10]))
    for f in base:
        for d in base[f]:
            assert torch.equal(base[f][d], module.cutoffs[f][d]), (f, d)
    assert module.calibration["misclassified"] >= 300
    labels, margins = module.detector.layer_table(xt)
    ok = labels == yt
    for frr, cuts in module.cutoffs.items():
        for d, cols in (("saec", [0]), ("contranet", [1]), ("mixdefense", [0, 1])):
            rejected = (margins.T[ok][:, cols] > cuts[d]).any(1)
            lo, hi = wilson_interval(int(rejected.sum()), int(ok.sum()))
            assert lo <= frr, (d, frr, lo, hi)  # never more rejections than the rate, up to sampling noise
            if d != "saec":  # continuous scores reach the rate; SAEC's noise level is coarse (ties): it may stay below
                assert frr <= hi, (d, frr, lo, hi)



def _squeezing_file(tmp_path: Path, data_root: Path):
    """The shipped MNIST LeNet, 200 validation images and a Feature Squeezing file calibrated on them at 5 %
    (``tmp_path/fs.pt``)."""
    from mixdefense.layers.squeezing import FeatureSqueezing

    clf = load_classifier(REPO / "artifacts/mnist/classifier.pt")
    x, _ = load_images("mnist", "val", 200, data_root=str(data_root))
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    fs.calibrate(x, 0.05)
    fs.save(tmp_path / "fs.pt")
    return clf, x


def test_baselines_on_the_same_curves(mnist_bundle, tmp_path, data_root, monkeypatch, capsys):
    """Feature Squeezing and MagNet score the bundle's AEs; a robust classifier is attacked on its own.

    The 'robust classifier' here is the bundle's own LeNet: attacked with the same deterministic
    FGSM on the same images it must give exactly the undefended classifier's Acc_RC."""
    from mixdefense.layers.magnet import MagNet, MagNetAutoencoder

    monkeypatch.chdir(tmp_path)
    clf, x = _squeezing_file(tmp_path, data_root)
    magnet = MagNet(MagNetAutoencoder(1), ["l1", "jsd:10"], clf)
    magnet.calibrate(x, 0.05)
    magnet.save(tmp_path / "magnet.pt")
    baselines = f"{{fs: {tmp_path / 'fs.pt'}, magnet: {tmp_path / 'magnet.pt'}, same_lenet: {REPO / 'artifacts/mnist/classifier.pt'}}}"
    args = _test_args(mnist_bundle, tmp_path / "report", data_root) + [f"--model.init_args.baselines={baselines}",
                                                                       "--model.init_args.attacks={fgsm: {budgets: [16, 64]}}"]
    assert main(args) == 0
    result = json.loads((tmp_path / "report/evaluation.json").read_text())
    assert "fs Acc_det" in capsys.readouterr().out
    by = {(r["eps"], r["defense"]): r for r in result["points"] if r["frr_target"] == 0.01}
    for eps in {r["eps"] for r in result["points"]}:
        assert by[(eps, "same_lenet")]["acc_rc"] == pytest.approx(by[(eps, "undefended")]["acc_rc"])
        assert by[(eps, "same_lenet")]["num_aes"] == by[(eps, "undefended")]["num_aes"]
        for d in ("fs", "magnet"):
            assert by[(eps, d)]["num_successful"] == by[(eps, "mixdefense")]["num_successful"]  # the same AEs
            assert 0 <= by[(eps, d)]["acc_rc"] <= 1
    base = result["clean"]["baselines"]
    assert base["same_lenet"]["accuracy_classifier"] == pytest.approx(result["clean"]["accuracy_classifier"])
    assert 0 <= result["clean"]["operating_points"]["0.05"]["fs"]["false_rejection"] <= 0.25  # 5 % on 300 val images
    for name in ("compare_acc_detector_frr1.png", "compare_acc_rc_frr5.png", "comparison.md"):
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


def test_compare_after_evaluate_reuses_the_bundle_parts(mnist_bundle, tmp_path, data_root, monkeypatch):
    """`make compare` after `make evaluate` (a shared partial_dir): the bundle's classifier is not attacked
    again, only the added robust classifier, and every number equals a compare run from scratch."""
    from lightning_modules.evaluation import MixDefenseEvaluation

    monkeypatch.chdir(tmp_path)
    clf, x = _squeezing_file(tmp_path, data_root)
    attacks = ["--model.init_args.attacks={pgd_linf: {budgets: [32, 64], steps: 3}}"]  # random start: seeds matter
    evaluate = f"--model.init_args.baselines={{fs: {tmp_path / 'fs.pt'}}}"
    compare = f"--model.init_args.baselines={{robust: {REPO / 'artifacts/mnist/classifier.pt'}, fs: {tmp_path / 'fs.pt'}}}"
    shared = f"--model.init_args.partial_dir={tmp_path / 'shared'}"
    assert main(_test_args(mnist_bundle, tmp_path / "scratch", data_root) + attacks + [compare]) == 0
    assert not (tmp_path / "scratch/partial").exists()  # the default folder goes with a finished run
    assert main(_test_args(mnist_bundle, tmp_path / "evaluate", data_root) + attacks + [evaluate, shared]) == 0
    calls = _count_attacks(monkeypatch)
    assert main(_test_args(mnist_bundle, tmp_path / "compare", data_root) + attacks + [compare, shared]) == 0
    assert calls == {"bundle": 0, "robust": 4}  # 4 batches: only the robust classifier was attacked
    assert len(list((tmp_path / "shared").glob("*_bundle_*.pt"))) == 4  # a named folder is kept
    scratch = json.loads((tmp_path / "scratch/evaluation.json").read_text())
    reused = json.loads((tmp_path / "compare/evaluation.json").read_text())
    assert reused["clean"] == scratch["clean"]
    assert len(reused["points"]) == len(scratch["points"])
    for a, b in zip(scratch["points"], reused["points"]):
        assert a == pytest.approx(b, nan_ok=True)



def _count_attacks(monkeypatch) -> dict[str, int]:
    """Count the bundle's and the robust classifiers' attacked batches from here on."""
    from lightning_modules.evaluation import MixDefenseEvaluation

    calls = {"bundle": 0, "robust": 0}
    for method, key in (("_attack_batch", "bundle"), ("_attack_robust", "robust")):
        original = getattr(MixDefenseEvaluation, method)

        def counted(self, *args, _original=original, _key=key):
            calls[_key] += 1
            return _original(self, *args)
        monkeypatch.setattr(MixDefenseEvaluation, method, counted)
    return calls


def _by_defense(report: Path, name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "defense"}
            for r in json.loads((report / "evaluation.json").read_text())["points"] if r["defense"] == name]


def test_parts_are_keyed_by_file_contents_not_paths_or_names(mnist_bundle, tmp_path, data_root, monkeypatch):
    """A bundle copied elsewhere (``make ship``) and baselines renamed and moved reuse every part: nothing is
    attacked again, and each renamed baseline's rows are its own (same numbers under the new name)."""
    import shutil

    monkeypatch.chdir(tmp_path)
    clf, _ = _squeezing_file(tmp_path, data_root)
    attacks = ["--model.init_args.attacks={pgd_linf: {budgets: [32, 64], steps: 3}}"]
    robust = REPO / "artifacts/mnist/classifier.pt"
    shared = f"--model.init_args.partial_dir={tmp_path / 'shared'}"
    first = f"--model.init_args.baselines={{fs: {tmp_path / 'fs.pt'}, robust: {robust}}}"
    assert main(_test_args(mnist_bundle, tmp_path / "first", data_root) + attacks + [first, shared]) == 0
    shipped = tmp_path / "shipped" / "detector.pt"
    shipped.parent.mkdir()
    shutil.copy(mnist_bundle, shipped)
    shutil.copy(tmp_path / "fs.pt", tmp_path / "squeezer.pt")
    shutil.copy(robust, tmp_path / "lenet_copy.pt")
    renamed = f"--model.init_args.baselines={{lenet: {tmp_path / 'lenet_copy.pt'}, squeeze: {tmp_path / 'squeezer.pt'}}}"
    calls = _count_attacks(monkeypatch)
    assert main(_test_args(shipped, tmp_path / "second", data_root) + attacks + [renamed, shared]) == 0
    assert calls == {"bundle": 0, "robust": 0}
    for old, new in (("mixdefense", "mixdefense"), ("fs", "squeeze"), ("robust", "lenet")):
        a, b = _by_defense(tmp_path / "first", old), _by_defense(tmp_path / "second", new)
        assert a and len(a) == len(b)
        for ra, rb in zip(a, b):
            assert ra == pytest.approx(rb, nan_ok=True)
    # one file content under two names would make the columns ambiguous
    twins = f"--model.init_args.baselines={{fs: {tmp_path / 'fs.pt'}, squeeze: {tmp_path / 'squeezer.pt'}}}"
    with pytest.raises(ValueError, match="same file content"):
        main(_test_args(shipped, tmp_path / "third", data_root) + attacks + [twins, shared])


def test_parts_of_the_legacy_format_are_upgraded_in_place(mnist_bundle, tmp_path, data_root, monkeypatch):
    """Parts written before content keys (path-keyed names, baseline columns by name) are reused once, rewritten
    under their content key, and the report equals the one they were made for."""
    from lightning_modules.evaluation import MixDefenseEvaluation

    monkeypatch.chdir(tmp_path)
    _squeezing_file(tmp_path, data_root)
    attacks = ["--model.init_args.attacks={pgd_linf: {budgets: [32, 64], steps: 3}}"]
    args = [f"--model.init_args.baselines={{fs: {tmp_path / 'fs.pt'}}}", f"--model.init_args.partial_dir={tmp_path / 'parts'}"]
    seen = []
    original = MixDefenseEvaluation._upgrade_legacy_part

    def remember(self, batch_idx, part, settings, files, data, path, signature):
        legacy = self._legacy_signature(settings, files, data)
        seen.append((legacy, self._partial_path(batch_idx, f"{part}_{legacy[:16]}"), path))
        return original(self, batch_idx, part, settings, files, data, path, signature)
    monkeypatch.setattr(MixDefenseEvaluation, "_upgrade_legacy_part", remember)
    assert main(_test_args(mnist_bundle, tmp_path / "first", data_root) + attacks + args) == 0
    monkeypatch.undo()
    assert len(seen) == 4
    for legacy, old, path in seen:  # rewrite each part as the old code wrote it
        done = torch.load(path, weights_only=True)
        del done["baseline_digests"]
        done["signature"] = legacy
        torch.save(done, old)
        path.unlink()
    calls = _count_attacks(monkeypatch)
    assert main(_test_args(mnist_bundle, tmp_path / "second", data_root) + attacks + args) == 0
    assert calls == {"bundle": 0, "robust": 0}
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == sorted(path.name for _, _, path in seen)
    assert "baseline_digests" in torch.load(seen[0][2], weights_only=True)
    for d in ("mixdefense", "fs"):
        for ra, rb in zip(_by_defense(tmp_path / "first", d), _by_defense(tmp_path / "second", d)):
            assert ra == pytest.approx(rb, nan_ok=True)

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

    def row(defense, eps, kept, det, rc, frr=0.01):
        return {"attack": "fgsm", "norm": "linf", "eps": eps, "minimum_norm": False, "defense": defense, "kept": kept,
                "acc_detector": det, "acc_rc": rc, "frr_target": frr}

    def clean(acc, fr=0.01):
        return {"accuracy": acc, "false_rejection": fr, "misclassified_rejected": 1, "misclassified": 3}

    result = {"baselines": ["fs", "madry"], "robust": ["madry"], "operating_points": [0.01, 0.05], "points": [
        row("mixdefense", 0.1, True, 0.9, 1.0), row("mixdefense", 0.2, True, 1.0, 1.0), row("mixdefense", 0.01, False, 0.5, 1.0),
        row("fs", 0.1, True, 0.7, 0.8), row("fs", 0.2, True, 0.9, 0.6), row("fs", 0.01, False, 0.5, 1.0),
        row("madry", 0.1, True, 0.5, 0.6), row("madry", 0.2, False, 0.5, 0.2), row("madry", 0.01, True, 0.5, 1.0),
        row("undefended", 0.1, True, 0.5, 0.0), row("undefended", 0.2, True, 0.5, 0.0), row("undefended", 0.01, False, 0.5, 1.0),
        row("fs", 0.1, True, 0.0, 0.0, frr=0.05)],  # another operating point: never mixed in
        "clean": {"operating_points": {"0.01": {"mixdefense": clean(0.98), "fs": clean(0.95), "madry": clean(0.97, 0.0),
                                                "undefended": clean(0.99, 0.0)}}}}
    lines = comparison_table(result, 0.01).splitlines()
    line = next(ln for ln in lines if ln.startswith("| fgsm"))
    cells = [c.strip() for c in line.strip("|").split("|")][1:]
    # composite and FS over ε 0.1 and 0.2; Madry only where both it and the composite keep the point (0.1)
    assert cells == ["95.0 / 100.0 (n=2)", "80.0 / 70.0 (n=2)", "— / 60.0 (n=1)", "— / 0.0 (n=2)"]
    assert next(ln for ln in lines if ln.startswith("| clean accuracy")).endswith("98.00 % | 95.00 % | 97.00 % | 99.00 % |")
    assert next(ln for ln in lines if ln.startswith("| misclassified")).endswith("1 / 3 | 1 / 3 | — | — |")
    assert "1 % clean false rejection" in lines[0]


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
    assert ae.shape[0] == 3 * correct and ae.shape[1] == 4 + 2  # 3 points × the correctly classified images, nothing else
    tiny = ae[ae[:, 0] == 1]  # C&W at L2 ≤ 0.05: no MNIST AE is that small
    assert (tiny[:, 1] == 0).all() and (tiny[:, 2] == 1).all() and (tiny[:, 3] == 0).all()
    large = ae[ae[:, 0] == 2]
    assert large[:, 1].sum() > 0 and (large[large[:, 1] == 1, 3] <= 3.0).all()

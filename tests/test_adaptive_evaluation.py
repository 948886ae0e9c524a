"""The complete adaptive evaluation (``mixdefense adaptive``) on tiny synthetic models: untargeted and top-k
goals, restarts, the subspace families, resumable parts and the robust-accuracy table."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mixdefense.commands.adaptive as cmd
from mixdefense.attacks.adaptive import (
    PipelineObjective,
    adaptive_pgd,
    make_subspace,
    untargeted_margin,
    with_restarts,
)
from mixdefense.attacks.targets import target_mode, target_sets, topk_wrong_labels
from mixdefense.commands import Data
from mixdefense.evaluation.parts import PartStore
from mixdefense.evaluation.robust import KNOWN_ROBUST, best_known, robust_entry, robust_markdown
from mixdefense.metrics import wilson_interval
from mixdefense.pipeline import MixDefense


# -- toys ------------------------------------------------------------------------------------
def linear_model(channels: int = 3, classes: int = 4, side: int = 8, seed: int = 1) -> nn.Module:
    """A fixed linear classifier on ``[B, channels, side, side]`` images (logits 0 at mid-gray)."""
    g = torch.Generator().manual_seed(seed)
    d = channels * side * side
    lin = nn.Linear(d, classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, d, generator=g) * 4.0 / side)
        lin.bias.copy_(-0.5 * lin.weight.sum(1))
    model = nn.Sequential(nn.Flatten(), lin).eval().requires_grad_(False)
    model.num_classes = classes
    return model


def images(n: int, channels: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    """``[n, C, side, side]`` in [0.3, 0.7]: small budgets never reach the box."""
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(seed)) * 0.4 + 0.3


class SmoothPost(nn.Module):
    """A post layer with a differentiable margin: rejects images whose mean brightness under label ``y`` is off
    a per-label level (``margin = exp(gain·|mean − level_y|) / exp(gain·tol)``)."""

    name, kind = "smooth", "post"

    def __init__(self, classes: int = 4, tol: float = 0.02, gain: float = 20.0):
        super().__init__()
        self.levels = torch.linspace(0.45, 0.55, classes)
        self.tol, self.gain = tol, gain

    def margin(self, x, y):
        return torch.exp(self.gain * ((x.mean((1, 2, 3)) - self.levels[y]).abs() - self.tol))

    def forward(self, x, y):
        return self.margin(x, y) > 1


class PixelClassifier(nn.Module):
    """Reads its label off pixel (0, 0, 0): label ``round(10·v) mod classes`` (a hand-made, exact classifier)."""

    num_classes = 4

    def forward(self, x):
        lab = (x[:, 0, 0, 0] * 10).round().long() % self.num_classes
        return torch.nn.functional.one_hot(lab, self.num_classes).float() * 5


class BanPost(nn.Module):
    """Rejects label ``banned`` (margin 2), accepts every other label (margin 0.5)."""

    name, kind = "ban", "post"

    def __init__(self, banned: int):
        super().__init__()
        self.banned = banned

    def margin(self, x, y):
        return torch.where(y == self.banned, 2.0, 0.5)

    def forward(self, x, y):
        return self.margin(x, y) > 1


def encode(labels: torch.Tensor, side: int = 4) -> torch.Tensor:
    """Images ``PixelClassifier`` labels as ``labels``."""
    x = torch.full((len(labels), 1, side, side), 0.5)
    x[:, 0, 0, 0] = labels.float() / 10
    return x


def toy_args(*extra: str):
    data = Data(datasets=["toy"], load_images=None, load_calibration=None)
    return cmd.parse_args(["--dataset", "toy", "--eps", "0.1", "--no-progress", *extra], data)


def toy_setup(n: int = 6, madry: bool = True) -> cmd.Setup:
    model = linear_model()
    det = MixDefense(model, [SmoothPost()])
    x = images(40)
    y = model(x).argmax(1)
    x, y = x[:n], y[:n]
    madry_obj = PipelineObjective(SimpleNamespace(classifier=linear_model(seed=2), layers=[])) if madry else None
    fp = {"dataset": "toy", "num_images": n, "images_sha256": cmd.images_sha256(x, y), "model": "mixdefense",
          "bundle_sha256": "toy", "contranet_thresholds": None, "contranet_target_frr": None, "seed": 0}
    return cmd.Setup(PipelineObjective(det), x, y, images(20, seed=5), 4, None, fp, madry_obj,
                     "toy madry" if madry else "not shipped", {**fp, "model": "madry"}, 0.9,
                     torch.ones(n, dtype=torch.bool))


# -- the untargeted goal ------------------------------------------------------------------------
def test_untargeted_margin_and_loss_on_hand_made_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 1.0, 0.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(untargeted_margin(logits, y), torch.tensor([-2.0, 4.0]))
    loss = PipelineObjective.classifier_loss(logits, y, targeted=False, confidence=1.0)
    torch.testing.assert_close(loss, torch.tensor([-1.0, 4.0]))  # clamped at −confidence
    torch.testing.assert_close(PipelineObjective.judged_labels(logits, y, targeted=False), torch.tensor([1, 1]))


def test_untargeted_pgd_raises_the_best_wrong_margin(one_thread):
    model = linear_model()
    obj = PipelineObjective(MixDefense(model, [SmoothPost()]))
    x = images(8)
    y = model(x).argmax(1)
    x_adv = adaptive_pgd(obj, x, y, eps=0.02, steps=5, targeted=False, confidence=100.0, progress=False).x_adv

    def wrong_margin(z):  # max_{j≠y} z_j − z_y, computed here independently of the library
        return torch.stack([max(z[i, j] for j in range(4) if j != y[i]) - z[i, y[i]] for i in range(len(y))])

    before, after = wrong_margin(model(x)), wrong_margin(model(x_adv))
    assert (after > before).all()  # max_{j≠y} z_j − z_y went up for every image
    assert (x_adv - x).abs().max() <= 0.02 + 1e-6


def test_untargeted_success_is_a_wrong_label_every_layer_accepts():
    det = MixDefense(PixelClassifier(), [BanPost(banned=2)])
    obj = PipelineObjective(det, differentiable=False)
    y = torch.tensor([1, 1, 1, 1])
    x = encode(torch.tensor([1, 2, 3, 0]))  # right label; wrong but banned; wrong and accepted; wrong and accepted
    v = obj.full_verdict(x, y, targeted=False)
    assert v.hit.tolist() == [False, True, True, True]
    assert v.fooled.tolist() == [False, False, True, True]
    assert v.accepted["ban"].tolist() == [True, False, True, True]  # judged under the classifier's own label
    # targeted at 3: only the image labelled 3 counts
    assert obj.full_verdict(x, torch.full((4,), 3)).fooled.tolist() == [False, False, True, False]


# -- top-k --------------------------------------------------------------------------------------
def test_topk_picks_the_largest_wrong_logits():
    logits = torch.tensor([[9.0, 1.0, 5.0, 7.0, 3.0], [0.0, 8.0, 6.0, 2.0, 4.0]])
    y = torch.tensor([0, 2])
    assert topk_wrong_labels(logits, y, 3).tolist() == [[3, 2, 4], [1, 4, 3]]
    sets = target_sets("topk:2", logits, y, 5, seed=0)
    assert [s.tolist() for s in sets] == [[3, 1], [2, 4]]
    assert target_sets("untargeted", None, y, 5, 0)[0] is y
    with pytest.raises(ValueError, match="topk"):
        topk_wrong_labels(logits, y, 5)
    assert target_mode("TopK:03") == "topk:3"
    with pytest.raises(Exception):
        target_mode("topk:0")


def test_an_image_broken_by_any_target_counts_once(monkeypatch, tmp_path):
    """Target 0 breaks images {0, 1}, target 1 breaks {1, 2}: 3 of 4 broken, each once; image 1 is never
    attacked toward target 1 (already broken) and keeps target 0's AE."""
    det = MixDefense(PixelClassifier(), [BanPost(banned=9)])
    y = torch.tensor([0, 0, 0, 0])
    x = encode(y)
    fp = {"dataset": "toy", "model": "mixdefense", "seed": 0}
    setup = cmd.Setup(PipelineObjective(det, differentiable=False), x, y, x, 4, None, fp)
    breaks = {0: [0, 1], 1: [1, 2]}
    seen = {}

    def fake(setup_, args_, attack, norm, eps, labels, targeted, todo, lam, mu, cache, key, progress):
        k = key[2]
        seen[k] = todo.tolist()
        out = x[todo].clone()
        for j, i in enumerate(todo.tolist()):
            if i in breaks[k]:
                out[j, 0, 0, 0] = labels[i].float() / 10  # the classifier now says the target
        return out, {}

    monkeypatch.setattr(cmd, "one_target", fake)
    monkeypatch.setattr(cmd, "obj_logits", lambda obj, xx: torch.tensor([[9.0, 3.0, 1.0, 2.0]]).repeat(len(xx), 1))
    part = cmd.attack_part(setup, toy_args("--targets", "topk:2"), "pgd", "topk:2", "linf", 0.1, 0.0, 0.0,
                           cmd.PartStore(tmp_path), {}, False)
    assert seen == {0: [0, 1, 2, 3], 1: [2, 3]}
    assert part["per_image"]["mixdefense"] == [1, 1, 1, 0]
    assert part["broken_by_target"] == [0, 0, 1, -1]
    assert part["row"]["mixdefense"] == 0.75 and part["row"]["targets"] == "topk:2"


# -- restarts -------------------------------------------------------------------------------------
def test_restarts_never_unbreak_an_image():
    x = torch.zeros(5, 1, 2, 2)
    calls = []

    def attack(idx, rand):
        calls.append((idx.tolist(), rand))
        return x[idx] + len(calls)  # run r marks its AEs with r

    plan = {1: {0, 1}, 2: {3}, 3: set()}  # run 3 would "unbreak" everything it sees

    def success(xa, idx):
        r = int(xa[0, 0, 0, 0])
        return torch.tensor([i in plan[r] for i in idx.tolist()])

    x_adv, broken = with_restarts(attack, x, 3, success)
    assert broken.tolist() == [True, True, False, True, False]
    assert calls == [([0, 1, 2, 3, 4], False), ([2, 3, 4], True), ([2, 4], True)]
    assert x_adv[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 1]  # broken: the first successful AE; else run 1's


def test_gradient_restarts_reattack_only_unbroken_images_from_random_starts(monkeypatch, one_thread):
    model = linear_model()
    obj = PipelineObjective(MixDefense(model, [SmoothPost()]))
    x = images(20)
    y = model(x).argmax(1)
    calls = []
    real = cmd.adaptive_pgd

    def spy(objective, xx, ll, **kw):
        calls.append((len(xx), kw["rand_init"]))
        return real(objective, xx, ll, **kw)

    monkeypatch.setattr(cmd, "adaptive_pgd", spy)
    hits = {}
    for r in (1, 3):
        calls.clear()
        args = toy_args("--restarts", str(r), "--steps", "1")
        xa = cmd.gradient_attack("pgd", obj, x, y, False, "linf", 0.004, args, None, progress=False)
        hits[r] = obj.hits(xa, y, targeted=False)
    assert 0 < int(hits[1].sum()) < 20  # run 1 breaks some images, not all
    assert (hits[1] <= hits[3]).all()  # restarts never un-break an image
    assert calls[0] == (20, False) and calls[1] == (20 - int(hits[1].sum()), True)  # run 2: the unbroken ones only
    assert all(n <= calls[1][0] and rand for n, rand in calls[2:])


# -- the subspace families ---------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.3)])
def test_tied_and_lowfreq_adaptive_aes_lie_in_their_subspace_within_budget(norm, eps, one_thread):
    model = linear_model()
    obj = PipelineObjective(MixDefense(model, [SmoothPost()]))
    x = images(6)
    t = (model(x).argmax(1) + 1) % 4
    kw = {"norm": norm, "eps": eps, "steps": 4, "alpha": eps, "lam": 1.0, "select": "pipeline", "progress": False,
          "rand_init": True, "generator": torch.Generator().manual_seed(0)}
    tied = adaptive_pgd(obj, x, t, subspace=make_subspace("channel_tied", model, norm=norm, eps=eps, steps=4), **kw).x_adv
    d = tied - x
    assert (d - d[:, :1]).abs().max() < 1e-6 and d.abs().max() > 0  # one perturbation, broadcast over the channels
    low = make_subspace("lowfreq", model, norm=norm, eps=eps, steps=4, factor=4)
    lf = adaptive_pgd(obj, x, t, subspace=low, **kw).x_adv
    d2 = lf - x
    # in the range of the bilinear upsampling U: least squares through U's explicit matrix leaves no residual
    basis = torch.eye(4).view(4, 1, 1, 2, 2)
    u = torch.stack([low.lift(b, x[:1, :1]).flatten() for b in basis], 1)  # [64, 4]: one channel
    coef = torch.linalg.lstsq(u, d2.permute(1, 0, 2, 3).reshape(3 * 6, 64).T).solution
    assert (u @ coef - d2.permute(1, 0, 2, 3).reshape(18, 64).T).abs().max() < 1e-5
    for dd in (d, d2):
        n = dd.flatten(1).abs().amax(1) if norm == "linf" else dd.flatten(1).norm(dim=1)
        assert n.max() <= eps + 1e-5
    with pytest.raises(ValueError, match="budget"):
        adaptive_pgd(obj, x, t, subspace=make_subspace("lowfreq", model, norm=norm, eps=2 * eps, steps=4), **kw)


def test_adaptive_subspace_attack_uses_the_layer_penalty(one_thread):
    model = linear_model()
    obj = PipelineObjective(MixDefense(model, [SmoothPost()]))
    x = images(6)
    t = (model(x).argmax(1) + 1) % 4
    sub = make_subspace("channel_tied", model, norm="linf", eps=0.1, steps=3)
    a = adaptive_pgd(obj, x, t, eps=0.1, steps=3, select="last", subspace=sub, progress=False).x_adv
    b = adaptive_pgd(obj, x, t, eps=0.1, steps=3, select="last", lam=10.0, kappa=10.0, subspace=sub, progress=False).x_adv
    assert (a - b).abs().max() > 0


# -- resumable parts ----------------------------------------------------------------------------
ATTACKS = ["pgd", "adaptive", "orthogonal", "adaptive_tied", "pgd_lowfreq", "square"]


def test_a_rerun_loads_every_part_and_a_changed_setting_recomputes(monkeypatch, tmp_path, one_thread):
    setup = toy_setup()
    base = ["--partial-dir", str(tmp_path), "--steps", "2", "--restarts", "2", "--queries", "5", "--sweep-images", "3",
            "--lambdas", "0", "1", "--mus", "0", "--targets", "untargeted", "topk:2", "--attacks", *ATTACKS]
    first = cmd.evaluate(setup, toy_args(*base), progress=False)
    assert first["parts"]["reused"] == 0 and first["parts"]["computed"] > 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert not any(f.endswith(".tmp") for f in files)

    def boom(*a, **k):
        raise RuntimeError("an attack ran")

    for name in ("adaptive_pgd", "orthogonal_pgd", "square_attack", "hop_skip_jump", "gradient_attack", "one_target"):
        monkeypatch.setattr(cmd, name, boom)
    second = cmd.evaluate(setup, toy_args(*base), progress=False)
    assert second["parts"]["computed"] == 0 and second["parts"]["reused"] == first["parts"]["computed"]
    strip = [{k: v for k, v in r.items() if k != "reused"} for r in second["rows"]]
    assert strip == first["rows"] and second["robust"] == first["robust"]
    assert all(r["reused"] for r in second["rows"])
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    with pytest.raises(RuntimeError, match="an attack ran"):  # one setting changed: its rows are recomputed
        cmd.evaluate(setup, toy_args(*base[:-len(ATTACKS)], "pgd", "--confidence", "0.5"), progress=False)
    with pytest.raises(RuntimeError, match="an attack ran"):  # other images: everything is recomputed
        other = dataclasses.replace(setup, fingerprint={**setup.fingerprint, "images_sha256": "other"})
        cmd.evaluate(other, toy_args(*base[:-len(ATTACKS)], "pgd"), progress=False)


def test_part_digest_covers_every_field():
    spec = {"kind": "row", "model": "mixdefense", "attack": "pgd", "targets": "untargeted", "norm": "linf", "eps": 0.1,
            "settings": {"steps": 10}, "bundle_sha256": "a", "contranet_thresholds": [1.0]}
    d = PartStore.digest(spec)
    for key, value in [("settings", {"steps": 11}), ("bundle_sha256", "b"), ("contranet_thresholds", [1.5]), ("eps", 0.2),
                       ("targets", "topk:3")]:
        assert PartStore.digest({**spec, key: value}) != d


def test_a_part_is_found_across_float_rounding_of_its_thresholds_and_nothing_more(tmp_path):
    """A threshold recalibrated on another machine differs in its last float32 bits: the part must still be reused
    (an MNIST run lost 45 parts to 0.5259537100791931 vs 0.5259538292884827); a real change must not be."""
    spec = {"kind": "row", "model": "mixdefense", "attack": "pgd", "targets": "untargeted", "norm": "linf", "eps": 0.1,
            "settings": {"steps": 10, "alpha": "2.5*eps/steps"}, "bundle_sha256": "a",
            "contranet_thresholds": [0.5259537100791931], "seed": 0}
    store = PartStore(tmp_path)
    store.save(spec, {"mixdefense": 0.25})
    rounded = {**spec, "contranet_thresholds": [0.5259538292884827]}
    assert PartStore.digest(rounded) != PartStore.digest(spec)
    again = PartStore(tmp_path)
    assert again.load(rounded)["mixdefense"] == 0.25 and again.reused == 1
    assert again.load(spec)["mixdefense"] == 0.25   # its own file, by digest
    for changed in ({"contranet_thresholds": [0.526]}, {"contranet_thresholds": [0.5259537100791931, 1.0]},
                    {"seed": 1}, {"bundle_sha256": "b"}, {"settings": {"steps": 11, "alpha": "2.5*eps/steps"}},
                    {"settings": {"steps": 10.0, "alpha": "2.5*eps/steps", "extra": 1}}):
        assert PartStore(tmp_path).load({**spec, **changed}) is None, changed
    assert PartStore(tmp_path).load({**spec, "eps": 0.1 * (1 + 1e-9)}) is not None   # float rounding of ε too
    (tmp_path / "row-mixdefense-pgd-untargeted-linf-0.1-garbage.json").write_text("not json")
    assert PartStore(tmp_path).load(rounded)["mixdefense"] == 0.25   # an unreadable neighbour is skipped


# -- the robust-accuracy table -----------------------------------------------------------------
def _row(attack, targets, mix, clf=1.0):
    return {"attack": attack, "targets": targets, "family": attack, "mixdefense": mix, "classifier": clf}


def test_robust_table_takes_the_per_image_worst_case_over_attacks():
    b = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    rows = [(_row("pgd", "untargeted", 0.25), b(1, 0, 0, 0, 0)),
            (_row("adaptive", "topk:3", 0.4), b(0, 1, 0, 1, 0)),
            (_row("square", "untargeted", 0.2), b(1, 0, 0, 0, 0))]
    e = robust_entry("cifar10", "linf", 16 / 255, rows, undefended_broken=b(1, 1, 1, 1, 0),
                     madry_robust=b(1, 1, 0, 0, 0), clean_accuracy=0.9, clean_accepted=b(1, 1, 1, 0, 0))
    assert e["defended_robust"] == 2 and e["defended_robust_accuracy"] == 0.4  # images 2 and 4: no attack broke them
    assert e["defended_ci95"] == list(wilson_interval(2, 5)) and e["defended_ci95"][0] < 0.4 < e["defended_ci95"][1]
    assert e["strongest_attack"] == "adaptive (topk:3)" and e["attacks"] == 3
    assert e["undefended_robust_accuracy"] == 0.2 and e["madry_robust_accuracy"] == 0.4
    assert e["defended_robust_and_clean_accepted"] == 0.2
    assert math.isclose(e["defended_robust_accuracy_all_test_images"], 0.36)
    assert e["eps_label"] == "0.06275 (16/255)" and e["tramer_eps_half_label"] == "0.03137 (8/255)"
    assert e["best_known_at_eps_half"] == 0.7371 and "RobustBench" in e["best_known_source"]
    none = robust_entry("gtsrb", "linf", 16 / 255, rows)
    assert none["best_known_at_eps_half"] is None and none["best_known_source"] == "no known figure"
    assert none["madry"] == "not shipped" and "madry_robust_accuracy" not in none
    md = robust_markdown("cifar10", [e, none])
    assert "40.0 % [" in md and "no known figure" in md and "8/255" in md


def test_known_figures_are_sourced_and_matched_exactly():
    for ds, norm, eps, acc, source in KNOWN_ROBUST:
        assert 0 < acc < 1 and len(source) > 20 and norm in cmd.NORMS
        assert best_known(ds, norm, eps)[0] == acc
    assert best_known("cifar10", "linf", 8 / 255 + 1e-4)[0] is None


def test_evaluate_writes_a_robust_row_per_budget_with_baselines(tmp_path, one_thread):
    setup = toy_setup(madry=True)
    args = toy_args("--partial-dir", str(tmp_path), "--steps", "2", "--restarts", "1", "--targets", "untargeted",
                    "--attacks", "pgd", "pgd_lowfreq")
    args.budgets = {"linf": [0.05, 0.1]}
    ev = cmd.evaluate(setup, args, progress=False)
    assert [e["eps"] for e in ev["robust"]] == [0.05, 0.1]
    for e in ev["robust"]:
        assert e["attacks"] == 2 and e["defended_ci95"] is not None and e["madry"] == "toy madry"
        assert e["undefended_robust_accuracy"] is not None and e["madry_robust_accuracy"] is not None
    assert {b["model"] for b in ev["baselines"]} == {"undefended classifier", "madry"}
    for r in ev["rows"]:
        assert {"family", "threat_model", "settings", "targets", "seconds"} <= set(r)
    assert {r["family"] for r in ev["rows"]} == {"pgd", "lowfreq"}
    assert all(r["threat_model"] == cmd.OBLIVIOUS for r in ev["rows"])
    # the undefended baseline is the pgd/untargeted row itself (one part, not two)
    assert ev["parts"]["computed"] == 2 * 2 + 2  # 2 attacks × 2 ε, Madry × 2 ε

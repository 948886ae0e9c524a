"""Gradient-free attacks (Square, HopSkipJump) and their pipeline objective: tiny synthetic models, plus real-data checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mixdefense.attacks.adaptive import PipelineObjective
from mixdefense.attacks.gradient_free import (
    ClassifierQueries,
    PipelineQueries,
    class_margin,
    hop_skip_jump,
    norms_of,
    square_attack,
    square_eta,
    square_p,
    within_budget,
)
from mixdefense.pipeline import MixDefense

REPO = Path(__file__).resolve().parents[1]


# -- toys ----------------------------------------------------------------------------------
def linear_model(classes: int = 3, side: int = 8, scale: float = 4.0) -> nn.Module:
    """A fixed linear classifier on ``[B, 1, side, side]`` images."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(side * side, classes)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(classes, side * side, generator=g) * scale / side)
        lin.bias.copy_(-0.5 * lin.weight.sum(1))  # logits 0 at the mid-gray image: every class occurs
    return nn.Sequential(nn.Flatten(), lin).eval().requires_grad_(False)


def images(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    """``[n, 1, side, side]`` in [0.25, 0.75] (away from the box, so clipping rarely binds)."""
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25


class ConstLayer(nn.Module):
    """A layer with a constant margin (> 1: rejects everything)."""

    def __init__(self, name: str, kind: str, value: float):
        super().__init__()
        self.name, self.kind, self.value = name, kind, value

    def margin(self, x, y=None):
        return torch.full((x.shape[0],), self.value)

    def forward(self, x, y=None):
        return self.margin(x, y) > 1


class BrightnessPre(nn.Module):
    """Pre layer: rejects images brighter on average than ``limit``."""

    name, kind = "bright", "pre"

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def margin(self, x, y=None):
        return x.mean((1, 2, 3)) / self.limit

    def forward(self, x, y=None):
        return self.margin(x) > 1


class LabelPost(nn.Module):
    """Post layer: rejects label ``banned`` (margin 2), and anything with a high-contrast pixel."""

    name, kind = "label", "post"

    def __init__(self, banned: int):
        super().__init__()
        self.banned = banned

    def margin(self, x, y):
        return torch.where(y == self.banned, 2.0, 0.5) + (x.flatten(1).amax(1) > 0.97).float()

    def forward(self, x, y):
        return self.margin(x, y) > 1


def min_l2_to_boundary(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The linear classifier's exact minimal L2 distance to another class (no box constraint) ``[B]``."""
    lin = model[1]
    z = model(x)
    w = lin.weight
    d = []
    for i in range(len(y)):
        others = [k for k in range(w.shape[0]) if k != y[i]]
        d.append(min(((z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).norm()).item() for k in others))
    return torch.tensor(d)


def toy_setup(n: int = 16):
    """The linear model, ``n`` images at least 0.2 (L2) from its decision boundary, and their labels."""
    model = linear_model()
    x = images(20 * n)
    y = model(x).argmax(1)
    far = (min_l2_to_boundary(model, x, y) >= 0.2).nonzero().squeeze(1)[:n]
    assert len(far) == n
    return model, x[far], y[far]


def pipeline_queries(model, layers, labels, targeted=False, **kw):
    det = MixDefense(model, layers)
    return det, PipelineQueries(PipelineObjective(det, differentiable=False), labels, targeted=targeted, **kw)


def deployed_success(det: MixDefense, x_adv, labels, targeted=False):
    """The pipeline's deployed decision from ``layer_table``: every margin ≤ 1 and the label wrong / the target."""
    lab, margins = det.layer_table(x_adv)
    accepted = (margins <= 1).all(0)
    return accepted & (lab == labels if targeted else lab != labels)


# -- the schedule and the building blocks ---------------------------------------------------------
def test_square_p_follows_the_papers_schedule():
    assert square_p(0.8, 0, 10000) == 0.8 and square_p(0.8, 10, 10000) == 0.8
    assert square_p(0.8, 11, 10000) == 0.4 and square_p(0.8, 51, 10000) == 0.2 and square_p(0.8, 201, 10000) == 0.1
    assert square_p(0.8, 501, 10000) == 0.05 and square_p(0.8, 8001, 10000) == 0.8 / 512
    assert square_p(0.8, 100, 1000) == square_p(0.8, 1000, 10000)  # rescaled to the horizon
    ps = [square_p(0.8, i, 1000) for i in range(1000)]
    assert all(a >= b for a, b in zip(ps, ps[1:]))


def test_square_eta_is_a_unit_two_signed_bump():
    for s in (3, 5, 9):
        eta = square_eta(s)
        assert eta.shape == (s, s) and abs(eta.norm().item() - 1) < 1e-5
        assert (eta[: s // 2] >= 0).all() and (eta[s // 2:] <= 0).all()


def test_class_margin_signs():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    lab = torch.tensor([0, 1])
    torch.testing.assert_close(class_margin(logits, lab, targeted=False), torch.tensor([2.0, -3.0]))
    torch.testing.assert_close(class_margin(logits, lab, targeted=True), torch.tensor([-2.0, 3.0]))


# -- Square --------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_square_stays_within_budget_and_box(norm, eps, masked, one_thread):
    model, x, y = toy_setup()
    x = x.clone()
    x[:4, :, :2] = 0.0  # some values at the box's edge
    x[4:8, :, -2:] = 1.0
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 2:6, 2:6] = 1
    r = square_attack(ClassifierQueries(model, y).score, x, norm=norm, eps=eps, n_queries=60, mask=mask, progress=False)
    assert r.x_adv.shape == x.shape and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert (norms_of(r.x_adv, x, norm) <= eps + 1e-6).all()
    torch.testing.assert_close(r.norms, norms_of(r.x_adv, x, norm))
    assert (r.x_adv != x).any()
    if masked:
        assert ((r.x_adv - x) * (1 - mask)).abs().max() == 0
    assert (r.queries <= 60).all() and (r.queries >= 1).all()


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.6)])
def test_square_fools_the_bare_classifier_and_says_so(norm, eps, one_thread):
    model, x, y = toy_setup()
    r = square_attack(ClassifierQueries(model, y).score, x, norm=norm, eps=eps, n_queries=200, progress=False)
    fooled = model(r.x_adv).argmax(1) != y
    assert torch.equal(fooled, r.success)
    assert r.success.float().mean() >= 0.5
    assert (r.loss[r.success] <= 0).all() and (r.loss[~r.success] > 0).all()


def test_square_targeted_reaches_the_target(one_thread):
    model, x, y = toy_setup()
    t = (y + 1) % 3
    r = square_attack(ClassifierQueries(model, t, targeted=True).score, x, eps=0.3, n_queries=200, progress=False)
    assert r.success.any()
    assert torch.equal(model(r.x_adv).argmax(1) == t, r.success)


def test_square_against_a_detector_that_rejects_everything_never_succeeds(one_thread):
    model, x, y = toy_setup()
    det, q = pipeline_queries(model, [ConstLayer("all", "post", 2.0)], y)
    r = square_attack(q.score, x, eps=0.3, n_queries=100, progress=False)
    assert not r.success.any()
    assert not deployed_success(det, r.x_adv, y).any()
    assert (model(r.x_adv).argmax(1) != y).any()  # the classifier alone is fooled: the detector is what stops it


def test_square_against_a_detector_that_rejects_nothing_equals_the_bare_classifier(one_thread):
    model, x, y = toy_setup()
    _, q = pipeline_queries(model, [ConstLayer("none_pre", "pre", 0.5), ConstLayer("none", "post", 0.5)], y)
    bare = square_attack(ClassifierQueries(model, y).score, x, eps=0.05, n_queries=100, progress=False)
    pipe = square_attack(q.score, x, eps=0.05, n_queries=100, progress=False)
    assert bare.success.any() and not bare.success.all()
    assert torch.equal(pipe.success, bare.success) and torch.equal(pipe.queries, bare.queries)
    torch.testing.assert_close(pipe.x_adv, bare.x_adv)


@pytest.mark.parametrize("targeted", [False, True])
def test_square_success_is_the_deployed_decision(targeted, one_thread):
    """Every image's success flag is what ``layer_table`` decides on the returned AE, with layers that bite."""
    model, x, y = toy_setup(24)
    labels = (y + 1) % 3 if targeted else y
    det, q = pipeline_queries(model, [BrightnessPre(0.52), LabelPost(banned=2)], labels, targeted=targeted)
    r = square_attack(q.score, x, eps=0.3, n_queries=150, progress=False)
    truth = deployed_success(det, r.x_adv, labels, targeted)
    assert torch.equal(r.success, truth)
    assert r.success.any()
    fooled = model(r.x_adv).argmax(1) == labels if targeted else model(r.x_adv).argmax(1) != labels
    assert (fooled & ~r.success).any()  # some AEs fool the classifier but are rejected: not successes
    loss, ok = q.score(r.x_adv, torch.arange(len(y)))
    assert torch.equal(ok, truth)


def test_square_more_queries_never_lower_success(one_thread):
    model, x, y = toy_setup(24)
    q = ClassifierQueries(model, y)
    runs = [square_attack(q.score, x, eps=0.08, n_queries=n, horizon=200, generator=torch.Generator().manual_seed(3),
                          progress=False) for n in (5, 20, 60, 200)]
    rates = [r.success.float().mean().item() for r in runs]
    assert rates[0] < rates[-1], rates  # the budgets matter on this problem
    for short, long in zip(runs, runs[1:]):
        assert not (short.success & ~long.success).any()
        assert torch.equal(short.queries[short.success], long.queries[short.success])


def test_square_is_reproducible_with_a_seeded_generator(one_thread):
    model, x, y = toy_setup()
    q = ClassifierQueries(model, y)
    for norm, eps in (("linf", 0.1), ("l2", 0.6)):
        a, b, c = (square_attack(q.score, x, norm=norm, eps=eps, n_queries=40, generator=torch.Generator().manual_seed(s),
                                 progress=False) for s in (7, 7, 8))
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
        assert not torch.equal(a.x_adv, c.x_adv)


def test_square_stops_querying_succeeded_images_and_counts_queries(one_thread):
    model, x, y = toy_setup()
    q = ClassifierQueries(model, y)
    seen: list[torch.Tensor] = []
    done = torch.zeros(len(y), dtype=torch.bool)

    def score(xb, idx):
        assert not done[idx].any(), "an image that already succeeded was queried again"
        loss, ok = q.score(xb, idx)
        seen.append(idx.clone())
        done[idx[ok]] = True
        return loss, ok

    r = square_attack(score, x, eps=0.05, n_queries=50, restarts=2, progress=False)
    counts = torch.bincount(torch.cat(seen), minlength=len(y))
    assert torch.equal(counts, r.queries)
    assert r.success.any() and (r.queries[r.success] < 100).any()
    assert (r.queries <= 100).all() and (r.queries[~r.success] == 100).all()


def test_square_restarts_only_help(one_thread):
    model, x, y = toy_setup(24)
    q = ClassifierQueries(model, y)
    one = square_attack(q.score, x, eps=0.05, n_queries=30, restarts=1, progress=False)
    three = square_attack(q.score, x, eps=0.05, n_queries=30, restarts=3, progress=False)
    assert not (one.success & ~three.success).any()
    assert (three.loss <= one.loss + 1e-6).all()


def test_square_refuses_bad_arguments():
    model, x, y = toy_setup(2)
    f = ClassifierQueries(model, y).score
    for kw in ({"norm": "l1", "eps": 0.1}, {"eps": 0.0}, {"eps": -1.0}, {"eps": 0.1, "n_queries": 0},
               {"eps": 0.1, "restarts": 0}, {"eps": 0.1, "p_init": 0.0}, {"eps": 0.1, "p_init": 1.5},
               {"eps": 0.1, "horizon": 0}, {"eps": 0.1, "mask": torch.ones(3, 1, 8, 8)}):
        with pytest.raises(ValueError):
            square_attack(f, x, progress=False, **kw)
    with pytest.raises(ValueError):
        square_attack(f, x * 2, eps=0.1, progress=False)
    with pytest.raises(ValueError):
        PipelineQueries(None, y, targeted=False, lam=-1.0)


# -- HopSkipJump ---------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_hsj_results_are_adversarial_within_box_and_never_get_worse(norm, one_thread):
    model, x, y = toy_setup(10)
    pool = images(200, seed=5)
    q = ClassifierQueries(model, y)
    r = hop_skip_jump(q.is_adversarial, x, pool, norm=norm, max_queries=800, progress=False)
    assert r.success.all()
    assert q.is_adversarial(r.x_adv, torch.arange(len(y))).all()
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    torch.testing.assert_close(r.norms, norms_of(r.x_adv, x, norm))
    assert r.trace.shape[1] >= 3
    assert (r.trace[:, 1:] <= r.trace[:, :-1]).all()
    torch.testing.assert_close(r.trace[:, -1], r.norms)
    assert (r.norms < 0.8 * r.trace[:, 0]).float().mean() >= 0.8  # the iterations shrink the start's distance
    assert (r.queries <= 800).all()


def test_hsj_l2_finds_the_linear_models_minimal_perturbation(one_thread):
    model, x, y = toy_setup(10)
    q = ClassifierQueries(model, y)
    r = hop_skip_jump(q.is_adversarial, x, images(200, seed=5), norm="l2", max_queries=3000, progress=False)
    exact = min_l2_to_boundary(model, x, y)
    ratio = r.norms / exact
    assert (ratio >= 1 - 1e-3).all()  # nobody beats the exact minimum
    assert ratio.median() <= 1.15, ratio


def test_hsj_budget_reproducibility_and_within_budget(one_thread):
    model, x, y = toy_setup(6)
    q = ClassifierQueries(model, y)
    pool = images(100, seed=5)
    a, b, c = (hop_skip_jump(q.is_adversarial, x, pool, max_queries=400, generator=torch.Generator().manual_seed(s),
                             progress=False) for s in (1, 1, 2))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.queries, b.queries)
    assert not torch.equal(a.x_adv, c.x_adv)
    assert (a.queries <= 400).all()
    broken = within_budget(a, x, float(a.norms.median()))
    inside = a.norms <= a.norms.median()
    assert torch.equal(broken[inside], a.x_adv[inside]) and torch.equal(broken[~inside], x[~inside])


def test_hsj_without_an_adversarial_start_fails_cleanly(one_thread):
    model, x, y = toy_setup(4)
    never = lambda xb, idx: torch.zeros(xb.shape[0], dtype=torch.bool)  # noqa: E731
    r = hop_skip_jump(never, x, images(20, seed=5), max_queries=300, progress=False)
    assert not r.success.any() and torch.isinf(r.norms).all() and torch.equal(r.x_adv, x)
    assert (r.queries <= 300).all()


def test_hsj_on_a_rejecting_pipeline_finds_nothing_and_on_an_accepting_one_what_the_classifier_gives(one_thread):
    model, x, y = toy_setup(6)
    pool = images(100, seed=5)
    _, reject = pipeline_queries(model, [ConstLayer("all", "post", 2.0)], y)
    assert not hop_skip_jump(reject.is_adversarial, x, pool, max_queries=300, progress=False).success.any()
    _, accept = pipeline_queries(model, [ConstLayer("none", "post", 0.5)], y)
    a = hop_skip_jump(accept.is_adversarial, x, pool, max_queries=300, progress=False)
    b = hop_skip_jump(ClassifierQueries(model, y).is_adversarial, x, pool, max_queries=300, progress=False)
    assert a.success.all() and torch.equal(a.x_adv, b.x_adv)


def test_hsj_an_already_adversarial_image_is_returned_with_norm_zero(one_thread):
    model, x, y = toy_setup(4)
    wrong = (y + 1) % 3
    wrong[1:] = y[1:]
    r = hop_skip_jump(ClassifierQueries(model, wrong).is_adversarial, x, images(50, seed=5), max_queries=200, progress=False)
    assert r.norms[0] == 0 and torch.equal(r.x_adv[0], x[0]) and r.queries[0] == 1


def test_hsj_refuses_bad_arguments():
    model, x, y = toy_setup(2)
    f = ClassifierQueries(model, y).is_adversarial
    pool = images(5, seed=5)
    for kw in ({"norm": "l1"}, {"max_queries": 0}, {"gamma": 0.0}, {"init_evals": 0}, {"iterations": -1}):
        with pytest.raises(ValueError):
            hop_skip_jump(f, x, pool, progress=False, **kw)
    with pytest.raises(ValueError):
        hop_skip_jump(f, x, torch.rand(5, 3, 8, 8), progress=False)


# -- real data -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_lenet():
    path = REPO / "artifacts/mnist/classifier.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    from mixdefense.classifiers import load_classifier

    return load_classifier(path).eval().requires_grad_(False)


@pytest.mark.data
def test_square_and_hsj_on_the_mnist_lenet(data_root, mnist_lenet, one_thread):
    from mixdefense.cli import load_images

    x_all, y_all = load_images("mnist", "test", 220, data_root=str(data_root))
    ok = (mnist_lenet(x_all[:20]).argmax(1) == y_all[:20]).nonzero().squeeze(1)[:8]
    x, y = x_all[ok], y_all[ok]
    q = ClassifierQueries(mnist_lenet, y)
    sq = square_attack(q.score, x, eps=0.3, n_queries=200, progress=False)
    assert sq.success.float().mean() >= 0.75 and (sq.norms <= 0.3 + 1e-6).all()
    hsj = hop_skip_jump(q.is_adversarial, x, x_all[20:], max_queries=1000, progress=False)
    assert hsj.success.all() and hsj.norms.median() < 0.7 * hsj.trace[:, 0].median()
    assert (mnist_lenet(hsj.x_adv).argmax(1) != y).all()


@pytest.mark.data
def test_adaptive_command_runs_the_gradient_free_families(data_root, tmp_path):
    bundle = REPO / "artifacts/mnist/detector.pt"
    if not bundle.exists():
        pytest.skip(f"{bundle} not found")
    from mixdefense.cli import main

    out = tmp_path / "gf"
    rc = main(["adaptive", "--dataset", "mnist", "--bundle", str(bundle), "--out", str(out), "--num-images", "2",
               "--attacks", "square", "hopskipjump", "--eps", "0.3", "--queries", "30", "--case-images", "2",
               "--case-steps", "2", "--calibration-images", "200", "--no-progress", "--threads", "1",
               "--targets", "random", "--partial-dir", str(tmp_path / "parts")])
    assert rc == 0
    report = json.loads((out / "adaptive.json").read_text())
    assert [r["attack"] for r in report["rows"]] == ["square", "hopskipjump"]
    for r in report["rows"]:
        assert r["family"] == r["attack"] and r["threat_model"] == "adaptive attacker (gradient-free, whole pipeline)"
        assert r["settings"]["queries_per_image"] == 30 and r["max_norm"] <= 0.3 + 1e-6
        assert r["attack_success"] == r["mixdefense"]
        assert 0 <= r["mixdefense"] <= min(r["saec"], r["contranet"]) <= r["classifier"] <= 1


def test_pipeline_objective_without_surrogates_takes_any_pre_layer_but_no_gradient_terms():
    model, x, y = toy_setup(3)
    det = MixDefense(model, [BrightnessPre(0.52), LabelPost(banned=2)])
    with pytest.raises(TypeError):
        PipelineObjective(det)  # a gradient attack needs a surrogate for every pre layer
    obj = PipelineObjective(det, differentiable=False)
    with pytest.raises(RuntimeError):
        obj.terms(x, y, ["bright"])
    v = obj.verdict(x, model(x).argmax(1))
    assert torch.equal(v.accepted["bright"], BrightnessPre(0.52).margin(x) <= 1)

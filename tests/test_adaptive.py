"""Adaptive attacks: the SAEC surrogate, budgets, the λ = μ = 0 reduction, Orthogonal PGD, §6 case studies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchattacks
from scipy.stats import spearmanr

from mixdefense.attacks.adaptive import (
    PipelineObjective,
    SoftSAEC,
    adaptive_pgd,
    attack_latent,
    fgsm_on_cgan_input,
    orthogonal_pgd,
    orthogonalize,
    plain_targeted_pgd,
    project,
    soft_histogram,
    soft_pseudo_saturation,
    support_mask,
)
from mixdefense.layers.saec import SAEC, batched_histogram, pseudo_saturation
from mixdefense.pipeline import load_detector

REPO = Path(__file__).resolve().parents[1]
MNIST_BUNDLE = REPO / "artifacts/mnist/detector.pt"


@pytest.fixture(scope="module")
def detector():
    if not MNIST_BUNDLE.exists():
        pytest.skip(f"{MNIST_BUNDLE} not found (make bundle DATASET=mnist)")
    return load_detector(MNIST_BUNDLE)


def _images(data_root, dataset: str, n: int) -> torch.Tensor:
    from datamodules import CIFAR10DataModule, MNISTDataModule

    dm = {"mnist": MNISTDataModule, "cifar10": CIFAR10DataModule}[dataset](data_root=str(data_root), test_subset=n)
    dm.setup("test")
    return dm.data_test.images.float() / 255, dm.data_test.labels


@pytest.fixture(scope="module")
def batch(detector):
    """Six real MNIST test images the classifier gets right, and a wrong target each."""
    root = Path(__import__("os").environ.get("MIXDEFENSE_DATA", REPO / "data"))
    if not (root / "MNIST" / "raw").exists():
        pytest.skip(f"real datasets not materialised under {root} (run `make data`)")
    x, y = _images(root, "mnist", 16)
    ok = detector.classifier(x).argmax(1) == y
    x, y = x[ok][:6], y[ok][:6]
    return x, y, (y + 3) % 10


# -- the SAEC surrogate --------------------------------------------------------------------
@pytest.mark.parametrize("channels,gray_mode", [(3, "local_mean"), (1, "identity"), (1, "local_mean")])
def test_soft_pseudo_saturation_equals_eq1(channels, gray_mode):
    x = torch.rand(4, channels, 16, 16)
    x[0] = x[0, :1]  # a gray pixel field: every channel agrees (where the p-norm's gradient is singular)
    soft = soft_pseudo_saturation(x, 8.0, gray_mode)
    torch.testing.assert_close(soft, pseudo_saturation(x, 8.0, gray_mode), atol=1e-5, rtol=1e-5)
    xi = x.clone().requires_grad_(True)
    soft_pseudo_saturation(xi, 8.0, gray_mode).sum().backward()
    assert torch.isfinite(xi.grad).all()


def test_soft_histogram_tends_to_the_hard_one():
    feat = torch.rand(3, 400) * 1.2 - 0.6  # some values out of range
    width = 1.0 / 16
    pos = (feat + 0.5) / width
    feat = torch.where((pos - pos.round()).abs() > 0.02, feat, torch.full_like(feat, 0.7))  # none within 2 % of an edge
    feat[:, :5] = torch.tensor([0.0, -0.5, 0.25, 0.5 - width, -0.5 + width])  # exactly on edges: the upper bin
    hard = batched_histogram(feat, 16, -0.5, 0.5) / feat.shape[1]
    soft = soft_histogram(feat, 16, -0.5, 0.5, temperature=0.001)
    torch.testing.assert_close(soft, hard, atol=2e-4, rtol=0)  # 5 edge values at 95 % (σ(3)) of 1/400 each
    assert (soft_histogram(feat, 16, -0.5, 0.5, temperature=0.5) - hard).abs().max() > 1e-3  # temperature matters


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_surrogate_score_ranks_like_the_real_one(data_root, dataset):
    path = REPO / f"artifacts/{dataset}/saec.pt"
    if not path.exists():
        pytest.skip(f"{path} not found")
    saec = SAEC.load(path)
    x, _ = _images(data_root, dataset, 100)
    g = torch.Generator().manual_seed(1)
    amp = 4 / 255 + torch.rand(len(x), 1, 1, 1, generator=g) * 60 / 255
    noisy = (x + (2 * torch.rand(x.shape, generator=g) - 1) * amp).clamp(0, 1)
    both = torch.cat([x, noisy])
    real, soft = saec.score(both), SoftSAEC(saec).score(both).detach()
    assert spearmanr(real.numpy(), soft.numpy())[0] >= 0.9
    # and the margin means the same thing: the surrogate's accept/reject agrees with the layer's
    agree = ((saec.margin(both) > 1) == (SoftSAEC(saec).margin(both) > 1)).float().mean()
    assert agree >= 0.95


def test_surrogate_needs_a_calibrated_layer_and_a_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SoftSAEC(SAEC(), temperature=0)
    with pytest.raises(RuntimeError, match="calibrated"):
        SoftSAEC(SAEC()).margin(torch.rand(1, 3, 8, 8))


# -- budgets -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.5)])
@pytest.mark.parametrize("attack", ["adaptive_last", "adaptive_pipeline", "orthogonal", "selective"])
def test_attacks_respect_their_budget_exactly(detector, batch, norm, eps, attack):
    x, _, t = batch
    obj = PipelineObjective(detector)
    kw = {"norm": norm, "eps": eps, "steps": 3, "alpha": eps, "progress": False}  # steps of a whole ε hit the ball's surface
    if attack.startswith("adaptive"):
        res = adaptive_pgd(obj, x, t, lam=1.0, mu=1.0, select=attack.split("_")[1], rand_init=True,
                           generator=torch.Generator().manual_seed(0), **kw)
    else:
        res = orthogonal_pgd(obj, x, t, mode=attack, **kw)
    d = (res.x_adv - x).flatten(1)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert d.norm(dim=1).max() <= eps + 1e-5
    assert d.abs().max() > 0  # it did move


def test_l2_projection_clips_to_the_ball_and_the_box():
    x = torch.rand(5, 3, 8, 8)
    far = x + torch.randn_like(x) * 3
    p = project(far, x, "l2", 0.7)
    assert ((p - x).flatten(1).norm(dim=1) <= 0.7 + 1e-5).all()
    assert p.min() >= 0 and p.max() <= 1
    near = (x + 1e-3 * torch.randn_like(x)).clamp(0, 1)
    torch.testing.assert_close(project(near, x, "l2", 0.7), near)


def test_a_support_mask_keeps_the_background_untouched(detector, batch):
    x, _, t = batch
    mask = support_mask(x, 1)
    assert mask.shape == (len(x), 1, 28, 28) and 0 < mask.mean() < 1
    res = adaptive_pgd(PipelineObjective(detector), x, t, eps=0.3, steps=3, lam=1.0, mu=1.0, mask=mask,
                       select="pipeline", progress=False)
    assert ((res.x_adv - x).abs() * (1 - mask)).max() == 0
    with pytest.raises(ValueError, match="mask"):
        adaptive_pgd(PipelineObjective(detector), x, t, eps=0.3, steps=1, mask=mask[:2], progress=False)


def test_bad_budgets_and_settings_raise(detector, batch):
    x, _, t = batch
    obj = PipelineObjective(detector)
    for kw, match in [({"eps": 0.0}, "eps"), ({"eps": 0.1, "norm": "l1"}, "norm"), ({"eps": 0.1, "select": "best"}, "select"),
                      ({"eps": 0.1, "lam": -1.0}, "lam")]:
        with pytest.raises(ValueError, match=match):
            adaptive_pgd(obj, x, t, progress=False, **kw)
    with pytest.raises(ValueError, match="mode"):
        orthogonal_pgd(obj, x, t, eps=0.1, mode="sideways", progress=False)


# -- λ = μ = 0 is plain targeted PGD -------------------------------------------------------------
def test_zero_weights_reduce_to_torchattacks_targeted_pgd(detector, batch):
    x, _, t = batch
    eps, steps = 0.2, 7
    ours = adaptive_pgd(PipelineObjective(detector), x, t, eps=eps, steps=steps, lam=0.0, mu=0.0, select="last",
                        progress=False).x_adv
    atk = torchattacks.PGD(detector.classifier, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    ref = atk(x, t)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, plain_targeted_pgd(detector.classifier, x, t, eps=eps, steps=steps), atol=1e-6, rtol=0)
    assert (detector.classifier(ours).argmax(1) == t).any()  # the comparison is not between two no-ops


def test_zero_weights_reduce_to_torchattacks_targeted_pgd_l2(detector, batch):
    x, _, t = batch
    eps, steps = 2.0, 5
    ours = adaptive_pgd(PipelineObjective(detector), x, t, norm="l2", eps=eps, steps=steps, select="last",
                        progress=False).x_adv
    atk = torchattacks.PGDL2(detector.classifier, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=False)
    atk.set_mode_targeted_by_label(quiet=True)
    torch.testing.assert_close(ours, atk(x, t), atol=1e-5, rtol=0)


def test_detector_terms_change_the_attack(detector, batch):
    """With λ > 0 the attack is not plain PGD any more (the ContraNet term has a gradient)."""
    x, _, t = batch
    obj = PipelineObjective(detector)
    plain = adaptive_pgd(obj, x, t, eps=0.2, steps=3, select="last", progress=False).x_adv
    adaptive = adaptive_pgd(obj, x, t, eps=0.2, steps=3, lam=10.0, kappa=10.0, select="last", progress=False).x_adv
    assert (plain - adaptive).abs().max() > 0


# -- Orthogonal PGD --------------------------------------------------------------------------
def test_orthogonalize_on_synthetic_vectors():
    g = torch.randn(4, 3, 5, 5)
    a, b = torch.randn_like(g), torch.randn_like(g)
    p = orthogonalize(g, [a, b])
    for v in (a, b):
        assert ((p * v).flatten(1).sum(1).abs() <= 1e-4 * v.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1)).all()
    inside = 2 * a - 3 * b
    assert orthogonalize(inside, [a, b]).flatten(1).norm(dim=1).max() <= 1e-4 * inside.flatten(1).norm(dim=1).max()
    torch.testing.assert_close(orthogonalize(g, [torch.zeros_like(g)]), g)  # a zero basis vector is skipped


def test_projected_classifier_gradient_is_orthogonal_to_the_detector_gradients(detector, batch):
    x, _, t = batch
    obj = PipelineObjective(detector)
    xi = x.clone().requires_grad_(True)
    terms = obj.terms(xi, t, obj.names)
    g_ce = torch.autograd.grad(terms["ce"].sum(), xi, retain_graph=True)[0]
    g_det = [torch.autograd.grad(terms[n].sum(), xi, retain_graph=True)[0] for n in obj.names]
    assert all(g.flatten(1).norm(dim=1).min() > 0 for g in g_det[1:])  # ContraNet's gradient exists
    p = orthogonalize(g_ce, g_det)
    for g in g_det:
        cos = (p * g).flatten(1).sum(1) / (p.flatten(1).norm(dim=1) * g.flatten(1).norm(dim=1) + 1e-30)
        assert cos.abs().max() < 1e-4
    # and the projection keeps most of what is orthogonal already: it is not the zero vector
    assert p.flatten(1).norm(dim=1).min() > 0


# -- success is decided by the real pipeline --------------------------------------------------
def test_verdict_agrees_with_the_detector(detector, batch):
    x, _, t = batch
    obj = PipelineObjective(detector)
    x_adv = adaptive_pgd(obj, x, t, eps=0.3, steps=5, lam=1.0, mu=1.0, select="pipeline",
                         mask=support_mask(x, 2), progress=False).x_adv
    v = obj.full_verdict(x_adv, t)
    d = detector.detect(x_adv)
    assert torch.equal(v.fooled, (d.labels == t) & ~d.rejected)
    assert torch.equal(v.hit, detector.classifier(x_adv).argmax(1) == t)


def test_untargeted_verdict_agrees_with_the_detector(detector, batch):
    x, y, _ = batch
    obj = PipelineObjective(detector)
    x_adv = adaptive_pgd(obj, x, y, eps=0.3, steps=5, lam=1.0, select="pipeline", targeted=False,
                         mask=support_mask(x, 2), progress=False).x_adv
    v = obj.full_verdict(x_adv, y, targeted=False)
    d = detector.detect(x_adv)
    assert torch.equal(v.fooled, (d.labels != y) & ~d.rejected)
    assert torch.equal(v.hit, detector.classifier(x_adv).argmax(1) != y) and v.hit.any()


# -- §6 case studies -----------------------------------------------------------------------
def test_case_studies_respect_their_budgets(detector, batch):
    x, _, t = batch
    rec = detector.layers[1].reconstructor
    x32 = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1)
    for steps in (1, 3):
        a = fgsm_on_cgan_input(rec, x32, t, 0.05, steps=steps)
        assert (a - x32).abs().max() <= 0.05 + 1e-6 and a.min() >= 0 and a.max() <= 1
    z0 = rec.encoder(x32)[0].detach()
    for steps in (1, 4):
        z = attack_latent(rec.generator, z0, t, x32, 0.2, steps=steps)
        assert (z - z0).abs().max() <= 0.2 + 1e-6 and (z - z0).abs().max() > 0


# -- the command ---------------------------------------------------------------------------
def test_adaptive_is_a_registered_tool():
    from mixdefense.cli import _tools

    assert "adaptive" in _tools()


def test_adaptive_report_writes_its_files(data_root, tmp_path, detector):
    from mixdefense.cli import main

    out = tmp_path / "adaptive"
    argv = ["adaptive", "--dataset", "mnist", "--bundle", str(MNIST_BUNDLE), "--out", str(out), "--num-images", "4",
            "--partial-dir", str(tmp_path / "parts"), "--sweep-images", "2", "--eps", "0.3", "--steps", "2", "--restarts", "1",
            "--targets", "random", "untargeted", "--attacks", "pgd", "adaptive", "orthogonal", "--lambdas", "0", "1",
            "--mus", "0", "--case-images", "3", "--case-steps", "2", "--calibration-images", "200", "--no-progress"]
    assert main(argv) == 0
    for name in ("adaptive.json", "adaptive.csv", "robust_accuracy.md", "success_vs_eps_linf_random.png",
                 "success_vs_eps_linf_untargeted.png", "figure12.png", "figure13.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "adaptive.json").read_text())
    assert report["images"] == 4 and report["norms"] == ["linf"] and report["budgets"] == {"linf": [0.3]}
    assert {(r["attack"], r["targets"]) for r in report["rows"]} == {
        (a, m) for a in ("pgd", "adaptive", "orthogonal") for m in ("random", "untargeted")}
    assert len(report["sweep"]["rows"]) == 4 and report["contranet_calibration"]["target_frr"] == 0.05
    for r in report["rows"]:
        assert 0 <= r["mixdefense"] <= min(r["saec"], r["contranet"]) <= r["classifier"] <= 1
        assert r["max_norm"] <= 0.3 + 1e-6 and r["family"] == r["attack"] and r["settings"]["restarts"] == 1
        assert r["threat_model"].startswith("oblivious" if r["attack"] == "pgd" else "adaptive")
    (robust,) = report["robust"]
    assert robust["eps"] == 0.3 and len(robust["defended_ci95"]) == 2 and robust["attacks"] == 6
    assert robust["tramer_eps_half"] == 0.15 and robust["best_known_source"] == "no known figure"
    assert "robust" in {row["table"] for row in __import__("csv").DictReader((out / "adaptive.csv").open())}
    assert main(argv) == 0  # a rerun: every row and sweep cell comes from its part
    again = json.loads((out / "adaptive.json").read_text())
    assert again["parts"]["computed"] == 0 and again["parts"]["reused"] == report["parts"]["computed"]
    assert again["robust"] == report["robust"]


def test_adaptive_recalibrates_on_correctly_classified_images_and_records_it(data_root):
    """Recalibration at another rate uses only the correctly classified calibration images; the record says so."""
    from mixdefense.cli import load_calibration_images
    from mixdefense.commands.adaptive import ensure_frr

    def load(dataset, split, n):
        return load_calibration_images(dataset, split, n, data_root=str(data_root))

    det = load_detector(MNIST_BUNDLE)  # a fresh copy: ensure_frr recalibrates in place
    held = ensure_frr(det, "mnist", 0.05, 200, load, "val")
    assert held["split"] == "val" and held["target_frr"] == 0.05
    assert held["num_images"] == held["correctly_classified"] == 200 - held["misclassified"]
    same = ensure_frr(det, "mnist", 0.05, 200, load)  # already at 5 %: kept as it is
    assert same["thresholds"] == held["thresholds"] and "split" not in same

"""Attack registry: budgets respected, [0, 1] kept, one-gradient sweeps equal per-ε runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mixdefense.attacks import (
    ATTACKS,
    fgm_sweep,
    fgsm_sweep,
    perturbation_norm,
    run_attack,
    run_sweep,
)
from mixdefense.classifiers import Classifier


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Classifier("lenet", 10, 1, 28, dataset="mnist").eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.mark.parametrize("name", [n for n, s in ATTACKS.items() if s.budgeted])
def test_budgeted_attacks_respect_their_budget_and_range(model, batch, name):
    x, y = batch
    spec = ATTACKS[name]
    eps = 8 / 255 if spec.norm == "linf" else 0.5
    x_adv = run_attack(name, model, x, y, eps)
    assert x_adv.shape == x.shape and 0 <= x_adv.min() and x_adv.max() <= 1
    assert (perturbation_norm(x_adv, x, spec.norm) <= eps * (1 + 1e-4) + 1e-6).all()
    assert (x_adv != x).any()


def test_fgsm_sweep_equals_torchattacks_fgsm_per_budget(model, batch):
    x, y = batch
    eps = [1 / 255, 8 / 255, 64 / 255]
    for e, swept in zip(eps, fgsm_sweep(model, x, y, eps)):
        assert torch.allclose(swept, run_attack("fgsm", model, x, y, e), atol=1e-6)


def test_fgm_sweep_equals_one_step_l2_per_budget(model, batch):
    x, y = batch
    eps = [0.1, 1.0, 3.0]
    for e, swept in zip(eps, fgm_sweep(model, x, y, eps)):
        assert torch.allclose(swept, run_attack("fgm", model, x, y, e), atol=1e-5)


def test_run_sweep_keeps_the_models_mode(model, batch):
    x, y = batch
    model.train()
    run_sweep("bim_linf", model, x, y, [2 / 255], steps=2)
    assert model.training
    model.eval()


def test_unbudgeted_and_unknown_attacks():
    assert not ATTACKS["cw"].budgeted and not ATTACKS["deepfool"].budgeted and not ATTACKS["deepfool_linf"].budgeted
    with pytest.raises(ValueError, match="unknown attack"):
        run_attack("jsma", None, None, None, 0.1)
    with pytest.raises(ValueError, match="needs a budget"):
        run_attack("fgsm", None, None, None, None)
    with pytest.raises(ValueError, match="norm"):
        perturbation_norm(torch.zeros(1, 3), torch.zeros(1, 3), "l1")


def test_batched_deepfool_equals_one_image_at_a_time(model, batch):
    """Batching changes nothing: each image's DeepFool AE is the one it gets when attacked alone."""
    x, y = batch
    together = run_attack("deepfool", model, x, y, steps=20)
    alone = torch.cat([run_attack("deepfool", model, x[i:i + 1], y[i:i + 1], steps=20) for i in range(len(y))])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.data
def test_deepfool_fools_the_shipped_lenet_despite_saturated_pixels(data_root):
    """Steps accumulate before clipping, so MNIST's 0/1 pixels do not stall it: every image is fooled."""
    clf, x, y = _shipped_lenet(data_root, 20)
    adv = run_attack("deepfool", clf, x, y)
    assert (clf(adv).argmax(1) != y).all()


def test_deepfool_linf_steps_are_sign_steps_and_fool(model, batch):
    x, y = batch
    y = model(x).argmax(1)
    adv = run_attack("deepfool_linf", model, x, y, steps=50)
    assert ATTACKS["deepfool_linf"].norm == "linf" and not ATTACKS["deepfool_linf"].budgeted
    assert (model(adv).argmax(1) != y).all() and adv.min() >= 0 and adv.max() <= 1
    # one L∞ step moves (almost) every pixel by the same amount: the L∞ norm is far below the L2-step's
    l2_adv = run_attack("deepfool", model, x, y, steps=50)
    assert perturbation_norm(adv, x, "linf").median() < perturbation_norm(l2_adv, x, "linf").median()


# -- the attacks at the literature's strength ------------------------------------------------------
@pytest.mark.data
def test_cw_binary_search_raises_c_until_it_succeeds(data_root):
    """On the shipped LeNet, one search step at a tiny c finds no AE (those images come back unchanged);
    the binary search (c ×10 until an AE is found, then bisection) fools every image."""
    from mixdefense.attacks import CarliniWagnerL2

    clf, x, y = _shipped_lenet(data_root, 8)
    one = CarliniWagnerL2(clf, search_steps=1, steps=30, initial_const=1e-4)(x, y)
    failed = clf(one).argmax(1) == y
    assert failed.all() and torch.equal(one, x)
    searched = CarliniWagnerL2(clf, search_steps=7, steps=30, initial_const=1e-4)(x, y)
    assert (clf(searched).argmax(1) != y).all()
    assert 0 <= searched.min() and searched.max() <= 1


@pytest.mark.parametrize("name", ["pgd_l2", "pgd_linf", "fgm", "bim_l2", "deepfool", "cw", "apgd_ce"])
def test_channels_last_wrapper_gives_the_same_aes(batch, name):
    """Attacks through :class:`ChannelsLast` (an RGB ResNet, where the format matters) give the AEs of the plain
    model up to float rounding; the input gradient comes back NCHW (torchattacks' L2 steps ``.view`` it)."""
    from mixdefense.attacks import ChannelsLast

    torch.manual_seed(0)
    net = Classifier("resnet_small", 10, 3, 16, dataset="cifar10",
                     arch_kwargs={"blocks": [1, 1, 1], "widths": [8, 8, 8]}).eval()
    x, y = torch.rand(4, 3, 16, 16), torch.arange(4)
    eps = None if not ATTACKS[name].budgeted else (8 / 255 if ATTACKS[name].norm == "linf" else 0.5)
    kwargs = {"search_steps": 2, "steps": 10} if name == "cw" else {"steps": 5} if name != "fgm" else {}
    torch.manual_seed(1)
    plain = run_attack(name, net, x, y, eps, **kwargs)
    torch.manual_seed(1)
    wrapped = run_attack(name, ChannelsLast(net), x, y, eps, **kwargs)
    assert torch.allclose(plain, wrapped, atol=1e-4)


@pytest.mark.data
def test_cw_early_abort_stops_each_image_on_its_own(data_root):
    """Per-image early abort: stalled images leave the batch (the model sees fewer images as a search step
    goes on) while the others keep running, and the AEs stay as small as without it (within 10 % in median)."""
    from mixdefense.attacks import CarliniWagnerL2

    clf, x, y = _shipped_lenet(data_root, 8)
    sizes = []
    hook = clf.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        aborted = CarliniWagnerL2(clf, search_steps=3, steps=60)(x, y)
        counts = list(sizes)
        sizes.clear()
        full = CarliniWagnerL2(clf, search_steps=3, steps=60, abort_early=False)(x, y)
    finally:
        hook.remove()
    assert sizes == [8] * 180  # no abort: every image, every iteration
    assert 0 < sum(counts) < sum(sizes)
    assert any(0 < n < 8 for n in counts)  # some images stopped while others went on
    assert (clf(aborted).argmax(1) != y).all() and (clf(full).argmax(1) != y).all()
    l2 = lambda adv: perturbation_norm(adv, x, "l2").median()  # noqa: E731
    assert l2(aborted) <= 1.1 * l2(full)


def _shipped_lenet(data_root, n: int):
    """The shipped MNIST LeNet and the first ``n`` test images it classifies correctly."""
    from mixdefense.classifiers import load_classifier
    from mixdefense.cli import load_images

    clf = load_classifier(Path(__file__).resolve().parents[1] / "artifacts/mnist/classifier.pt").eval()
    x, y = load_images("mnist", "test", n + 10, data_root=str(data_root))
    ok = clf(x).argmax(1) == y
    return clf, x[ok][:n], y[ok][:n]


def test_cw_high_confidence_reaches_its_margin(model, batch):
    from mixdefense.attacks import CarliniWagnerL2

    x, y = batch
    y = model(x).argmax(1)
    kappa = 0.5
    adv = CarliniWagnerL2(model, search_steps=6, steps=40, kappa=kappa)(x, y)
    logits = model(adv)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), float("-inf")).amax(1)
    fooled = logits.argmax(1) != y
    assert fooled.any() and (other - true)[fooled].min() > kappa - 1e-4


def test_restarts_keep_the_first_ae_that_fools(model, batch):
    """Restarts never lose an AE: an image fooled by the first run keeps exactly that AE."""
    import torchattacks

    from mixdefense.attacks import Restarts

    x, y = batch
    y = model(x).argmax(1)
    torch.manual_seed(1)
    first = torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=5, random_start=True)
    torch.manual_seed(1)
    once = first(x, y)
    torch.manual_seed(1)
    kept = Restarts(first, 3)(x, y)
    fooled_once = model(once).argmax(1) != y
    assert torch.equal(kept[fooled_once], once[fooled_once])
    assert (model(kept).argmax(1) != y).sum() >= fooled_once.sum()
    assert (perturbation_norm(kept, x, "linf") <= 4 / 255 + 1e-6).all()


def test_registry_defaults_are_the_literatures_strength():
    assert ATTACKS["pgd_linf"].defaults["steps"] >= 50 and ATTACKS["bim_l2"].defaults["steps"] >= 50
    cw = ATTACKS["cw"].defaults
    assert cw["search_steps"] >= 6 and cw["search_steps"] * cw["steps"] >= 1000
    assert ATTACKS["cw_hc"].defaults["kappa"] > 0
    assert ATTACKS["deepfool"].defaults["steps"] >= 100 and ATTACKS["deepfool"].defaults["overshoot"] == 0.02
    assert {"apgd_ce", "apgd_dlr"} <= set(ATTACKS)


@pytest.mark.data
def test_cw_fools_the_shipped_lenet_on_every_image(data_root):
    """The minimum-norm attack succeeds on ≥ 99 % of the bare classifier's images (here: all of 20)."""
    clf, x, y = _shipped_lenet(data_root, 20)
    adv = run_attack("cw", clf, x, y)
    assert (clf(adv).argmax(1) != y).all()
    assert perturbation_norm(adv, x, "l2").median() < 2.5  # minimal AEs: MNIST's LeNet needs ~1.2 in L2

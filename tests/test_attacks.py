"""Attack registry: budgets respected, [0, 1] kept, one-gradient sweeps equal per-ε runs."""

from __future__ import annotations

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


def test_batched_deepfool_takes_torchattacks_deepfool_steps(model, batch):
    """The batched L2 DeepFool equals torchattacks' per-image loop (same linearisation, same update)."""
    import torchattacks

    x, y = batch
    y = model(x).argmax(1)  # start from correctly classified inputs
    ref = torchattacks.DeepFool(model, steps=20, overshoot=0.02)(x, y)
    ours = run_attack("deepfool", model, x, y, steps=20, overshoot=0.02)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (model(ours).argmax(1) != y).all()


def test_deepfool_linf_steps_are_sign_steps_and_fool(model, batch):
    x, y = batch
    y = model(x).argmax(1)
    adv = run_attack("deepfool_linf", model, x, y, steps=50)
    assert ATTACKS["deepfool_linf"].norm == "linf" and not ATTACKS["deepfool_linf"].budgeted
    assert (model(adv).argmax(1) != y).all() and adv.min() >= 0 and adv.max() <= 1
    # one L∞ step moves (almost) every pixel by the same amount: the L∞ norm is far below the L2-step's
    l2_adv = run_attack("deepfool", model, x, y, steps=50)
    assert perturbation_norm(adv, x, "linf").median() < perturbation_norm(l2_adv, x, "linf").median()

"""Algorithm 1 under Lightning: one manual-optimisation step updates G, E, D, each in its phase."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.cgan import CGANModule, kl_to_standard_normal, random_wrong_labels


def _tiny(**kw) -> CGANModule:
    return CGANModule(in_channels=1, image_size=16, num_classes=4, latent_dim=4, enc_channels=(4, 8, 8),
                      gen_channels=(8, 8, 8, 4), dis_channels=(4, 4, 4, 4), **kw)


def _loader(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 1, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)), batch_size=n)


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


@pytest.mark.parametrize("w_cls", [0.0, 1.0])
def test_one_step_updates_each_network_only_in_its_phase(w_cls):
    model = _tiny(w_cls=w_cls)
    phases = []
    nets = {"generator": model.generator, "encoder": model.encoder, "discriminator": model.discriminator}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for opt, name in zip(trainer.optimizers, nets):
                original = opt.step

                def step(*a, _orig=original, _name=name, **k):
                    before = {n: _snapshot(m) for n, m in nets.items()}
                    out = _orig(*a, **k)
                    phases.append((_name, sorted(n for n, m in nets.items() if _changed(before[n], m))))
                    return out

                opt.step = step

    before = {n: _snapshot(m) for n, m in nets.items()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Spy()], accelerator="cpu")
    trainer.fit(model, _loader())
    assert [p[0] for p in phases] == ["generator", "encoder", "discriminator"]
    for name, changed in phases:
        assert changed == [name], phases  # only the intended network moves in its phase
    assert all(_changed(before[n], m) for n, m in nets.items())


def test_wrong_labels_never_equal_the_true_ones():
    y = torch.randint(0, 10, (1000,))
    w = random_wrong_labels(y, 10, torch.Generator().manual_seed(0))
    assert (w != y).all() and w.min() >= 0 and w.max() < 10
    assert len(w.unique()) == 10


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    assert kl_to_standard_normal(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0
    assert kl_to_standard_normal(torch.ones(3, 5), torch.zeros(3, 5)).item() == pytest.approx(2.5)


def test_figure8_grid_shape():
    model = _tiny().eval()
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 1, 2])
    grid = model.figure8_grid(x, y, other=6)  # only 3 other labels exist with 4 classes
    assert grid.shape[1] == 3 * 17 + 1 and grid.shape[2] == 5 * 17 + 1


def test_divergence_stops_with_a_clear_error():
    model = _tiny()
    with pytest.raises(FloatingPointError, match="diverged"):
        model._check("generator", torch.tensor(float("nan")))


def test_bad_settings():
    with pytest.raises(ValueError, match="adv_loss"):
        _tiny(adv_loss="wgan")
    with pytest.raises(FileNotFoundError, match="binding_classifier"):
        _tiny(binding_classifier="nowhere.pt")


def _fit(model, tmp_path, epochs, ckpt_path=None, callbacks=()):
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=list(callbacks))
    trainer.fit(model, _loader(n=16), ckpt_path=ckpt_path)
    return trainer


def test_resume_restores_weights_and_all_three_optimizers(tmp_path):
    first = _tiny(w_cls=1.0)
    trainer = _fit(first, tmp_path / "b", epochs=1)
    ckpt = tmp_path / "b" / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert len(saved["optimizer_states"]) == 3 and all(s["state"] for s in saved["optimizer_states"])

    seen = {}

    class AtResume(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen["epoch"] = trainer.current_epoch
            seen["state"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            seen["optim"] = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    resumed = _tiny(w_cls=1.0)
    _fit(resumed, tmp_path / "c", epochs=2, ckpt_path=ckpt, callbacks=[AtResume()])
    assert seen["epoch"] == 1  # continued where it stopped, not from scratch
    for k, v in saved["state_dict"].items():
        assert torch.equal(seen["state"][k], v), k
    for now, then in zip(seen["optim"], saved["optimizer_states"]):  # G, E, D: Adam moments and steps came back
        assert now["state"].keys() == then["state"].keys()
        for i in now["state"]:
            assert torch.equal(now["state"][i]["exp_avg"], then["state"][i]["exp_avg"])
            assert int(now["state"][i]["step"]) == int(then["state"][i]["step"]) > 0

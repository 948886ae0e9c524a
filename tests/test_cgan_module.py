"""Algorithm 1 under Lightning: one manual-optimisation step updates G, E, D, each in its phase."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.cgan import (
    CGANModule,
    kl_to_standard_normal,
    linear_decay,
    random_wrong_labels,
)


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
    for decay in ([5, 5], [-1, 3], [4]):
        with pytest.raises(ValueError, match="lr_decay"):
            _tiny(lr_decay=decay)
    with pytest.raises(ValueError, match="lr_final_fraction"):
        _tiny(lr_decay=[0, 2], lr_final_fraction=0.0)


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


def test_linear_decay_is_flat_then_linear_then_flat():
    assert [linear_decay(b, 10, 20, 0.1) for b in (0, 10)] == [1.0, 1.0]
    assert linear_decay(15, 10, 20, 0.1) == pytest.approx(0.55)
    assert [linear_decay(b, 10, 20, 0.1) for b in (20, 500)] == [pytest.approx(0.1)] * 2
    assert len(_tiny().configure_optimizers()) == 3  # no decay configured: three optimizers, no schedulers


def test_lr_decay_steps_once_per_batch_and_resumes(tmp_path):
    """Two epochs of one batch each with a decay over batches [0, 2]: every optimizer ends at the
    final fraction; a checkpoint after the first batch restores the schedulers' position."""
    model = _tiny(lr_g=1e-3, lr_e=2e-3, lr_d=4e-3, lr_decay=[0, 2], lr_final_fraction=0.25)
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, _loader(n=8))
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == pytest.approx([0.625e-3, 1.25e-3, 2.5e-3])  # halfway
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _tiny(lr_g=1e-3, lr_e=2e-3, lr_d=4e-3, lr_decay=[0, 2], lr_final_fraction=0.25)
    trainer = pl.Trainer(max_epochs=3, limit_val_batches=0, logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(resumed, _loader(n=8), ckpt_path=ckpt)
    assert [s.last_epoch for s in resumed._schedulers()] == [3, 3, 3]
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == pytest.approx([0.25e-3, 0.5e-3, 1e-3])


def test_channels_last_is_the_same_model_in_another_layout(tmp_path):
    plain = _tiny()
    fast = _tiny(channels_last=True)
    fast.load_state_dict(plain.state_dict())
    fast.setup("fit")
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x, y = next(iter(_loader()))
    assert torch.allclose(plain.eval().reconstruct(x, y), fast.eval().reconstruct(x, y), atol=1e-5)


def test_losses_stay_float32_under_bf16_autocast():
    model = _tiny()
    x, y = next(iter(_loader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec = model.generator(model.encoder(x)[0], y)
        assert rec.dtype == torch.bfloat16  # the convolutions did run in bf16
        assert model.dist(rec, x).dtype == torch.float32


def test_bf16_mixed_channels_last_training_updates_all_three_networks(tmp_path):
    model = _tiny(channels_last=True, w_cls=1.0)
    before = {name: _snapshot(getattr(model, name)) for name in ("encoder", "generator", "discriminator")}
    trainer = pl.Trainer(max_epochs=1, limit_val_batches=0, logger=False, default_root_dir=tmp_path, precision="bf16-mixed",
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, _loader(n=8))
    for name, snap in before.items():
        assert _changed(snap, getattr(model, name)), name
        assert all(torch.isfinite(p).all() for p in getattr(model, name).parameters())


def test_paper_settings_train_with_eqs_3_to_5_alone():
    """The ``*_paper_variant.yaml`` switches (adv_loss bce, no wrong-label term, no mismatched reals, no class
    critic, no binding classifier): one Algorithm-1 step whose three losses are exactly
    G: Dist(G(z, y), x) − w_adv·log d(1|G(z, y), y)          (eq. 4, with Dist as −log p(x|z, y))
    E: Dist(G(z, y), x) + w_kl·KL(q(z|x) ‖ N(0, I))         (eq. 3)
    D: −log d(1|x, y) − log d(0|G(z, y), y)                  (eq. 5)
    and in which G and D only ever see the true labels."""
    w_adv, w_kl = 0.1, 0.002
    model = _tiny(adv_loss="bce", wrong_label_adv=False, mismatch_fake=False, w_cls=0.0, w_adv=w_adv, w_kl=w_kl)
    assert model.discriminator.classifier is None and model.binder is None
    x, y = next(iter(_loader()))
    gen_calls, enc_calls, d_labels, losses = [], [], [], {}
    generator_forward, encoder_sample = model.generator.forward, model.encoder.sample
    score_features, descend = model.discriminator.score_features, model._descend

    def spy_generator(z, labels):
        out = generator_forward(z, labels)
        gen_calls.append((labels.clone(), out.detach()))
        return out

    def spy_sample(*args, **kwargs):
        out = encoder_sample(*args, **kwargs)
        enc_calls.append(tuple(t.detach() for t in out))
        return out

    def spy_score(h, labels):
        d_labels.append(labels.clone())
        return score_features(h, labels)

    def spy_descend(opt, loss, name):
        d = model.discriminator.eval()  # no batch norm in D; spectral norm reuses its current estimate
        with torch.no_grad():
            fake = gen_calls[0][1]  # G(z, y) of the generator phase (D trains on it too)
            if name == "generator":
                expected = model.dist(fake, x) - w_adv * torch.nn.functional.logsigmoid(d(fake, y)).mean()
            elif name == "encoder":
                _, mu, logvar = enc_calls[1]
                expected = model.dist(gen_calls[1][1], x) + w_kl * kl_to_standard_normal(mu, logvar)
            else:
                expected = (-torch.nn.functional.logsigmoid(d(x, y)).mean()
                            - torch.nn.functional.logsigmoid(-d(fake, y)).mean())  # log(1 − σ(l)) = log σ(−l)
        d.train()
        losses[name] = (float(loss.detach()), float(expected))
        descend(opt, loss, name)

    model.generator.forward, model.encoder.sample = spy_generator, spy_sample
    model.discriminator.score_features, model._descend = spy_score, spy_descend
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu")
    trainer.fit(model, _loader())
    assert list(losses) == ["generator", "encoder", "discriminator"]
    for name, (loss, expected) in losses.items():  # (D's step ran one spectral-norm power iteration between its
        assert loss == pytest.approx(expected, rel=1e-4, abs=1e-6), name  # real and fake passes: ~1e-5 apart)
    assert len(gen_calls) == 2 and all(torch.equal(labels, y) for labels, _ in gen_calls)  # G(z, y) only
    assert d_labels and all(torch.equal(labels, y) for labels in d_labels)  # D(·, y) only: no (x, y′), no (G(z, y′), y′)


def test_bce_is_the_papers_log_loss():
    model = _tiny(adv_loss="bce")
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.0])
    p_real, p_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(model._adv_g(fake), -torch.log(p_fake).mean())  # eq. 4: −log d(1|G(z, y), y)
    torch.testing.assert_close(model._adv_d(real, fake), -torch.log(p_real).mean() - torch.log(1 - p_fake).mean())  # eq. 5

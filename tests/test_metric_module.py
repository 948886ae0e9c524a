"""The metric-model LightningModule: one step trains M only (the cGAN stays frozen), validation logs AUROC."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.metric import MetricModule
from mixdefense.nets import Reconstructor, save_cgan


def _save_tiny(tmp_path):
    save_cgan(Reconstructor(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)), tmp_path / "tiny.pt")
    return tmp_path / "tiny.pt"


def _module(tmp_path, **kw) -> MetricModule:
    return MetricModule(str(_save_tiny(tmp_path)), embedding_dim=6, channels=(4, 8), negatives_per_image=3, **kw)


def _loader(n: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(n, 1, 16, 16), torch.arange(n) % 10), batch_size=8)


def test_one_step_updates_the_metric_net_and_never_the_cgan(tmp_path):
    module = _module(tmp_path, anchor_noise=0.05, reference_latent_noise=1.0)
    before_m = {k: v.clone() for k, v in module.metric.state_dict().items()}
    before_r = {k: v.clone() for k, v in module.reconstructor.state_dict().items()}
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader())
    assert any(not torch.equal(before_m[k], v) for k, v in module.metric.state_dict().items())
    assert all(torch.equal(before_r[k], v) for k, v in module.reconstructor.state_dict().items())  # BN stats too
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/auroc"]) <= 1.0
    assert 0.0 <= float(metrics["train/active"]) <= 1.0 and float(metrics["train/mined"]) >= 0


def test_confusable_negatives_use_the_classifier_and_log_their_auroc(tmp_path):
    from mixdefense.classifiers import Classifier, save_classifier

    clf = save_classifier(Classifier("lenet", 10, 1, 16), tmp_path / "clf.pt")
    module = _module(tmp_path, classifier=str(clf), confusable_negatives=2, confusable_top_k=4)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader())
    assert 0.0 <= float(trainer.callback_metrics["val/auroc_confusable"]) <= 1.0
    assert not any(k.startswith("_classifier") for k in module.state_dict())  # frozen, never saved with M


def test_channels_last_trains_the_same_model_in_another_layout(tmp_path):
    from mixdefense.classifiers import Classifier, save_classifier

    clf = save_classifier(Classifier("lenet", 10, 1, 16), tmp_path / "clf.pt")
    torch.manual_seed(0)
    plain = _module(tmp_path, classifier=str(clf), confusable_negatives=1)
    torch.manual_seed(0)
    fast = _module(tmp_path, classifier=str(clf), confusable_negatives=1, channels_last=True)
    fast.setup("fit")
    for net in (fast.reconstructor, fast.metric, fast._classifier[0]):
        convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x, y = next(iter(_loader()))
    y_wrong = (y + 1) % 10
    for a, b in zip(plain.pair_distances(x, y, y_wrong), fast.pair_distances(x, y, y_wrong)):
        assert torch.allclose(a, b, atol=1e-5)
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(fast, _loader(), _loader())
    assert 0.0 <= float(trainer.callback_metrics["val/auroc"]) <= 1.0


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-cgan"):
        MetricModule(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="negatives_per_image"):
        MetricModule(str(_save_tiny(tmp_path)), negatives_per_image=10)
    with pytest.raises(ValueError, match="miner"):
        MetricModule(str(_save_tiny(tmp_path)), miner="hardest")
    with pytest.raises(ValueError, match="classifier"):
        MetricModule(str(_save_tiny(tmp_path)), confusable_negatives=2)
    with pytest.raises(ValueError, match="confusable_negatives"):
        MetricModule(str(_save_tiny(tmp_path)), negatives_per_image=3, confusable_negatives=4, classifier="x")
    with pytest.raises(ValueError, match="reference_latent_noise"):
        MetricModule(str(_save_tiny(tmp_path)), reference_latent_noise=-1.0)


def test_adversarial_anchors_are_pgd_aes_labelled_with_the_true_class_and_logged(tmp_path):
    from mixdefense.classifiers import Classifier, save_classifier
    from mixdefense.triplets import adversarial_anchors

    clf_path = save_classifier(Classifier("lenet", 10, 1, 16), tmp_path / "clf.pt")
    module = _module(tmp_path, classifier=str(clf_path), adversarial_anchors=4, adversarial_eps=(4 / 255, 8 / 255),
                     adversarial_val_eps=0.3)
    x, y = next(iter(_loader()))
    clf = module._classifier[0]
    x_adv, y_adv = adversarial_anchors(clf, x, y, 8 / 255)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not (x_adv == x).all() and not (y_adv == y).any()
    masked = clf(x_adv).detach().clone()
    masked[torch.arange(len(y)), y] = -torch.inf
    assert torch.equal(y_adv, masked.argmax(1))  # the wrong label the classifier scores highest
    x_adv, anchor_labels, refs, ref_labels = module._adversarial_triplets(x, y)
    assert x_adv.shape == (4, 1, 16, 16) and torch.equal(anchor_labels, y[:4])
    assert refs.shape == (8, 1, 16, 16) and torch.equal(ref_labels[:4], y[:4]) and not (ref_labels[4:] == y[:4]).any()
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader())
    assert 0.0 <= float(trainer.callback_metrics["val/auroc_adversarial"]) <= 1.0  # ε 0.3 fools an untrained LeNet


def test_adversarial_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="adversarial_anchors needs"):
        _module(tmp_path, adversarial_anchors=4)
    with pytest.raises(ValueError, match="adversarial_eps"):
        _module(tmp_path, classifier=None, adversarial_eps=(0.1, 0.05))
    with pytest.raises(ValueError, match="adversarial_val_eps"):
        _module(tmp_path, adversarial_val_eps=4 / 255)


class _IndexedData(pl.LightningDataModule):
    """A datamodule as the real ones are seen by the reference bank: ``data_train``, ``augment``."""

    def __init__(self, n: int = 24, indexed: bool = True, augment: bool = False):
        super().__init__()
        from datamodules.base import ImageTensorDataset

        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        self.data_train = ImageTensorDataset(images, torch.arange(n) % 10, with_index=indexed)
        self.data_val = ImageTensorDataset(images[:8], torch.arange(8) % 10)
        self.augment = augment

    def train_dataloader(self):
        return DataLoader(self.data_train, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data_val, batch_size=8)


def _bank_module(tmp_path, **kw):
    from mixdefense.classifiers import Classifier, save_classifier

    clf = save_classifier(Classifier("lenet", 10, 1, 16), tmp_path / "clf.pt")
    return _module(tmp_path, classifier=str(clf), confusable_negatives=2, confusable_top_k=3, reference_bank=True,
                   bank_uniform_negatives=2, **kw)


def test_reference_bank_trains_m_without_running_the_cgan_per_step(tmp_path, monkeypatch):
    import lightning_modules.metric as metric_module

    module = _bank_module(tmp_path)
    before = {k: v.clone() for k, v in module.metric.state_dict().items()}

    def no_cgan(*args, **kwargs):
        raise AssertionError("training steps must take their references from the bank")

    monkeypatch.setattr(metric_module, "reconstruction_references", no_cgan)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         limit_val_batches=1, val_check_interval=3)
    data = _IndexedData()
    trainer.fit(module, datamodule=data)
    bank = module.bank
    assert len(bank) == 24 and bank.labels.shape == (24, 1 + 3 + 2)
    assert torch.equal(bank.labels[:, 0], data.data_train.labels)
    x = data.data_train.images.float() / 255
    with torch.no_grad():
        expected = module.reconstructor(x, data.data_train.labels)
    torch.testing.assert_close(bank.references[:, 0].float(), expected, atol=1e-3, rtol=0)
    assert any(not torch.equal(before[k], v) for k, v in module.metric.state_dict().items())
    assert all(v.dtype == torch.float32 for v in module.metric.state_dict().values() if v.is_floating_point())
    assert 0.0 <= float(trainer.callback_metrics["val/auroc"]) <= 1.0


@pytest.mark.parametrize("indexed,augment,match", [(False, False, "train_indices"), (True, True, "augment")])
def test_reference_bank_refuses_unindexed_or_augmented_training_sets(tmp_path, indexed, augment, match):
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match=match):
        trainer.fit(_bank_module(tmp_path), datamodule=_IndexedData(indexed=indexed, augment=augment))


def test_reference_bank_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="reference_bank"):
        _bank_module(tmp_path, reference_latent_noise=1.0)
    with pytest.raises(ValueError, match="bank_uniform_negatives"):
        _module(tmp_path, reference_bank=True, bank_uniform_negatives=2)  # 3 uniform negatives per image needed


@pytest.mark.parametrize("setting", ["plain", "adversarial", "reference_bank"])
def test_paper_triplets_pair_each_anchor_with_its_own_images_reconstructions(tmp_path, setting):
    """``triplets: paper``: the references the objective gets, with their owners, are each ``R(anchor image, label)``
    of the owner's own anchor image (the adversarial anchors' too, and the bank's); one step trains."""
    from mixdefense.classifiers import Classifier, save_classifier

    kw = {"triplets": "paper", "miner": "semihard"}
    if setting == "adversarial":
        kw.update(classifier=str(save_classifier(Classifier("lenet", 10, 1, 16), tmp_path / "clf.pt")),
                  adversarial_anchors=4)
    if setting == "reference_bank":
        kw.update(reference_bank=True, bank_uniform_negatives=4)
    module = _module(tmp_path, **kw)
    seen = {}
    metric_forward, objective_forward = module.metric.forward, module.objective.forward

    def spy_metric(images):
        if module.training:
            seen["images"] = images.detach().clone()
        return metric_forward(images)

    def spy_objective(anchors, anchor_labels, refs, ref_labels, ref_owners=None):
        seen.update(anchors=len(anchors), anchor_labels=anchor_labels, ref_labels=ref_labels, owners=ref_owners)
        stats = objective_forward(anchors, anchor_labels, refs, ref_labels, ref_owners)
        seen["stats"] = stats
        return stats

    module.metric.forward, module.objective.forward = spy_metric, spy_objective
    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    if setting == "reference_bank":
        trainer.fit(module, datamodule=_IndexedData())
    else:
        trainer.fit(module, _loader(), _loader())
    a = seen["anchors"]
    assert a == (8 + 4 if setting == "adversarial" else 8)
    anchor_images, ref_images = seen["images"][:a], seen["images"][a:]
    owners, ref_labels = seen["owners"], seen["ref_labels"]
    assert owners is not None and len(owners) == len(ref_images) and set(owners.tolist()) == set(range(a))
    rec = module.reconstructor
    with torch.no_grad():
        expected = rec.generator(rec.encoder(anchor_images[owners])[0], ref_labels)  # R(owner's image, label)
    torch.testing.assert_close(ref_images, expected, atol=2e-3 if setting == "reference_bank" else 1e-5, rtol=0)
    for i in range(a):  # one own positive (the anchor's label), the rest its wrong-label reconstructions
        own = ref_labels[owners == i]
        assert int((own == seen["anchor_labels"][i]).sum()) == 1
    assert seen["stats"].num_triplets == 8 * 3 + (4 if setting == "adversarial" else 0)
    assert torch.isfinite(seen["stats"].loss)


def test_triplets_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="triplets"):
        _module(tmp_path, triplets="images")

"""Baselines (issue 7): Feature Squeezing, MagNet, Madry adversarial training; as layers and compared defenses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.ndimage import median_filter as scipy_median

from mixdefense.classifiers import Classifier, load_classifier, save_classifier
from mixdefense.evaluation.baselines import (
    DetectorBaseline,
    RobustClassifier,
    load_baseline,
)
from mixdefense.layers.magnet import (
    MagNet,
    MagNetAutoencoder,
    jensen_shannon,
    parse_detector,
)
from mixdefense.layers.squeezing import (
    FeatureSqueezing,
    bit_depth,
    median_filter,
    parse_squeezer,
    squeeze,
)
from mixdefense.pipeline import MixDefense, load_detector, save_bundle

REPO = Path(__file__).resolve().parents[1]


class FixedLogits(nn.Module):
    """A 'classifier' whose logits are a fixed linear read-out of the mean pixel (for known-answer tests)."""

    num_classes, in_channels, image_size = 3, 1, 8

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([10 * m, 10 * (1 - m), torch.zeros_like(m)], 1)


def _tiny_classifier(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier("lenet", 10, 1, 28).eval()


# -- squeezers -----------------------------------------------------------------------


def test_bit_depth_on_known_values():
    x = torch.tensor([0.0, 0.2, 0.49, 0.51, 0.8, 1.0]).view(1, 1, 1, 6)
    assert bit_depth(x, 1).flatten().tolist() == [0, 0, 0, 1, 1, 1]
    three = bit_depth(x, 3).flatten()
    assert torch.allclose(three * 7, torch.round(three * 7))  # 8 levels
    assert bit_depth(x, 8).sub(x).abs().max() <= 0.5 / 255 + 1e-7


@pytest.mark.parametrize("k", [2, 3, 4])
def test_median_filter_equals_scipy(k):
    x = torch.rand(2, 3, 9, 11)
    ref = np.stack([[scipy_median(c.numpy(), size=k, mode="reflect") for c in img] for img in x])
    assert np.array_equal(median_filter(x, k).numpy(), ref)


def test_squeezer_specs_are_checked():
    assert parse_squeezer("bits:5") == ("bits", 5) and parse_squeezer("median:2") == ("median", 2)
    for bad in ("bits", "median:x", "blur:2", "bits:-1"):
        with pytest.raises(ValueError, match="squeezer"):
            parse_squeezer(bad)
    with pytest.raises(ValueError, match="bits"):
        squeeze(torch.rand(1, 1, 4, 4), "bits:0")


def test_feature_squeezing_score_on_known_input():
    """Mean pixel 0.4 → 1-bit squeezing turns the image to 0 → the softmax moves by a known L1 amount."""
    fs = FeatureSqueezing(["bits:1"], FixedLogits())
    x = torch.full((1, 1, 8, 8), 0.4)
    p = torch.softmax(torch.tensor([4.0, 6.0, 0.0]), 0)
    q = torch.softmax(torch.tensor([0.0, 10.0, 0.0]), 0)
    assert fs.score(x).item() == pytest.approx((p - q).abs().sum().item(), rel=1e-5)
    # an image the squeezers leave unchanged scores 0
    assert fs.score(torch.zeros(1, 1, 8, 8)).item() == pytest.approx(0.0, abs=1e-7)
    assert FeatureSqueezing(["bits:1", "median:2"], FixedLogits()).score(x).item() >= fs.score(x).item()  # max over squeezers


def test_feature_squeezing_calibration_hits_its_target_and_round_trips(tmp_path):
    clf = _tiny_classifier()
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    with pytest.raises(RuntimeError, match="not calibrated"):
        fs(torch.rand(2, 1, 28, 28))
    x = torch.rand(400, 1, 28, 28)
    cal = fs.calibrate(x, 0.05)
    assert cal.achieved_frr <= 0.05 and cal.achieved_frr >= 0.04  # continuous scores: the quantile lands on target
    assert fs(x).float().mean().item() == pytest.approx(cal.achieved_frr)
    fs.save(tmp_path / "fs.pt")
    back = FeatureSqueezing.load(tmp_path / "fs.pt", clf)
    assert torch.equal(back.margin(x[:50]), fs.margin(x[:50]))
    with pytest.raises(RuntimeError, match="bind"):
        FeatureSqueezing.load(tmp_path / "fs.pt").score(x[:2])


def test_feature_squeezing_rejects_bad_images():
    fs = FeatureSqueezing(["bits:1"], FixedLogits())
    for bad in (torch.rand(8, 8), torch.full((1, 1, 8, 8), 2.0), torch.full((1, 1, 8, 8), math.nan)):
        with pytest.raises(ValueError):
            fs.score(bad)


# -- MagNet --------------------------------------------------------------------------


def test_jensen_shannon_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert jensen_shannon(p, q).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)
    assert jensen_shannon(p, q)[0] == pytest.approx(jensen_shannon(q, p)[0])


def test_magnet_scores_equal_the_formulas_and_calibration_hits_target(tmp_path):
    torch.manual_seed(0)
    ae = MagNetAutoencoder(1, (3, 3), True)
    clf = _tiny_classifier()
    magnet = MagNet(ae, ["l1", "l2", "jsd:10"], clf)
    x = torch.rand(300, 1, 28, 28)
    s = magnet.scores(x[:5])
    rec = ae(x[:5])
    assert torch.allclose(s[:, 0], (x[:5] - rec).abs().flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(s[:, 1], (x[:5] - rec).pow(2).flatten(1).mean(1), atol=1e-6)
    jsd = jensen_shannon(torch.softmax(clf(x[:5]) / 10, 1), torch.softmax(clf(rec) / 10, 1))
    assert torch.allclose(s[:, 2], jsd, atol=1e-6)
    cal = magnet.calibrate(x, 0.05)
    assert cal.achieved_frr <= 0.05 and cal.achieved_frr >= 0.03
    assert magnet(x).float().mean().item() == pytest.approx(cal.achieved_frr)
    assert torch.equal(magnet.reformed_labels(x[:4]), clf(ae(x[:4])).argmax(1))
    magnet.save(tmp_path / "m.pt")
    back = MagNet.load(tmp_path / "m.pt", clf)
    assert torch.allclose(back.margin(x[:20]), magnet.margin(x[:20]))
    for bad in ("l3", "jsd", "jsd:-1", "kl:10"):
        with pytest.raises(ValueError, match="MagNet detector"):
            parse_detector(bad)


def test_magnet_autoencoder_shapes_and_range():
    for ch, hidden, pool, side in ((1, (3, 3), True, 28), (3, (3,), False, 32)):
        y = MagNetAutoencoder(ch, hidden, pool)(torch.rand(2, ch, side, side))
        assert y.shape == (2, ch, side, side) and y.min() >= 0 and y.max() <= 1


# -- as layers of the composite and as compared defenses ----------------------------


def test_baselines_plug_into_the_composite_and_its_bundle(tmp_path):
    clf = _tiny_classifier()
    x = torch.rand(200, 1, 28, 28)
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    fs.calibrate(x, 0.1)
    magnet = MagNet(MagNetAutoencoder(1), ["l1", "jsd:10"], clf)
    magnet.calibrate(x, 0.1)
    detector = MixDefense(clf, [fs, magnet])
    verdict = detector.detect(x[:64])
    back = load_detector(save_bundle(detector, tmp_path / "d.pt"))
    again = back.detect(x[:64])
    assert torch.equal(verdict.rejected, again.rejected) and torch.equal(verdict.labels, again.labels)
    assert torch.equal(verdict.layer, again.layer)
    # the first layer rejects exactly what it rejects alone; the second sees only the rest
    assert torch.equal(verdict.rejected_by("feature_squeezing"), fs(x[:64]))
    assert torch.equal(verdict.rejected, fs(x[:64]) | magnet(x[:64]))


def test_load_baseline_by_file_kind(tmp_path):
    clf = _tiny_classifier()
    fs = FeatureSqueezing(["bits:1"], clf)
    fs.calibrate(torch.rand(50, 1, 28, 28), 0.05)
    fs.save(tmp_path / "fs.pt")
    save_classifier(_tiny_classifier(1), tmp_path / "madry.pt")
    assert isinstance(load_baseline("fs", tmp_path / "fs.pt", clf), DetectorBaseline)
    robust = load_baseline("madry", tmp_path / "madry.pt", clf)
    assert isinstance(robust, RobustClassifier) and robust.attack_model is robust.model
    labels, margins = robust.labels_and_margins(torch.rand(3, 1, 28, 28))
    assert labels.shape == (3,) and (margins == 0).all()
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a baseline file"):
        load_baseline("x", tmp_path / "other.pt", clf)
    with pytest.raises(FileNotFoundError):
        load_baseline("x", tmp_path / "missing.pt", clf)
    save_classifier(Classifier("lenet", 10, 1, 32), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="image_size"):
        load_baseline("w", tmp_path / "wrong.pt", clf)


def test_madry_training_step_trains_on_pgd_examples_within_budget():
    from lightning_modules.classifier import ClassifierModule

    with pytest.raises(ValueError, match="unknown keys"):
        ClassifierModule(adversarial={"eps": 0.3, "alpha": 0.05, "steps": 3, "bogus": 1})
    with pytest.raises(ValueError, match="eps"):
        ClassifierModule(adversarial={"alpha": 0.05, "steps": 3})
    start = str(REPO / "artifacts/mnist/classifier.pt")
    with pytest.raises(ValueError, match="differs"):  # no dropout, no MNIST normalisation: another classifier
        ClassifierModule(adversarial={"eps": 0.3, "alpha": 0.05, "steps": 3}, init_weights=start)
    module = ClassifierModule(adversarial={"eps": 0.3, "alpha": 0.05, "steps": 3}, init_weights=start, dataset="mnist",
                              arch_kwargs={"dropout": 0.25})
    ref = load_classifier(REPO / "artifacts/mnist/classifier.pt")
    assert all(torch.equal(a, b) for a, b in zip(module.model.state_dict().values(), ref.state_dict().values()))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    adv = module.attack(x, y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_madry_curriculum_ramps_the_budget_linearly():
    from types import SimpleNamespace

    from lightning_modules.classifier import ClassifierModule

    module = ClassifierModule(adversarial={"eps": 0.3, "alpha": 0.05, "steps": 2, "ramp_epochs": 2})
    module._trainer = SimpleNamespace(num_training_batches=10, current_epoch=0)
    assert module.budget_scale(4) == pytest.approx(0.25)  # half of epoch 0 of a 2-epoch ramp
    module._trainer.current_epoch = 1
    assert module.budget_scale(4) == pytest.approx(0.75)
    module._trainer.current_epoch = 3
    assert module.budget_scale(0) == 1.0
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    assert (module.attack(x, y, scale=0.25) - x).abs().max() <= 0.075 + 1e-6
    with pytest.raises(ValueError, match="ramp_epochs"):
        ClassifierModule(adversarial={"eps": 0.3, "alpha": 0.05, "steps": 2, "ramp_epochs": -1})


def test_labels_and_margins_equal_the_separate_calls():
    """The shared-pass method gives exactly the classifier's (reformed) labels and the layer's margin."""
    clf = _tiny_classifier()
    x = torch.rand(100, 1, 28, 28)
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    fs.calibrate(x, 0.1)
    magnet = MagNet(MagNetAutoencoder(1), ["l1", "jsd:10"], clf)
    magnet.calibrate(x, 0.1)
    labels, margins = fs.labels_and_margins(x[:20])
    assert torch.equal(labels, clf(x[:20]).argmax(1)) and torch.allclose(margins, fs.margin(x[:20]))
    labels, margins = magnet.labels_and_margins(x[:20])
    assert torch.equal(labels, magnet.reformed_labels(x[:20])) and torch.allclose(margins, magnet.margin(x[:20]))
    l1_only = MagNet(MagNetAutoencoder(1), ["l1"], clf)
    l1_only.calibrate(x, 0.1)
    assert torch.equal(l1_only.labels_and_margins(x[:5])[0], l1_only.reformed_labels(x[:5]))

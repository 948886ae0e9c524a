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
from mixdefense.commands.baselines import SQUEEZERS
from mixdefense.evaluation.baselines import (
    BundleBaseline,
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
    lab_to_rgb,
    median_filter,
    non_local_means,
    parse_squeezer,
    rgb_to_lab,
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


def _nlm_reference(x: np.ndarray, search: int, patch: int, h: float) -> np.ndarray:
    """Non-local means pixel by pixel, straight from the formula (numpy's 'reflect' = OpenCV's BORDER_DEFAULT)."""
    s2, p2 = search // 2, patch // 2
    pad = s2 + p2
    c, height, width = x.shape
    xp = np.pad(x.astype(np.float64) * 255, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.zeros((c, height, width))
    for i in range(height):
        for j in range(width):
            ci, cj = i + pad, j + pad
            ref = xp[:, ci - p2:ci + p2 + 1, cj - p2:cj + p2 + 1]
            num, den = np.zeros(c), 0.0
            for di in range(-s2, s2 + 1):
                for dj in range(-s2, s2 + 1):
                    other = xp[:, ci + di - p2:ci + di + p2 + 1, cj + dj - p2:cj + dj + p2 + 1]
                    w = math.exp(-((ref - other) ** 2).mean() / h**2)
                    w = 0.0 if w < 1e-3 else w
                    num += w * xp[:, ci + di, cj + dj]
                    den += w
            out[:, i, j] = num / den / 255
    return out


def _smooth_image(c: int = 3, size: int = 24) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([0.5 + 0.3 * torch.sin(3 * xx + 2 * yy + k) for k in range(c)])[None]


def test_non_local_means_equals_the_formula_pixel_by_pixel():
    torch.manual_seed(0)
    x = _smooth_image(2, 8) + 0.05 * torch.rand(1, 2, 8, 8)
    ours = non_local_means(x.double(), search=5, patch=3, h=15.0)[0].numpy()
    assert np.allclose(ours, _nlm_reference(x[0].double().numpy(), 5, 3, 15.0), atol=1e-9)


def test_rgb_to_lab_matches_opencv_and_round_trips():
    """OpenCV's float ``cvtColor(bgr, COLOR_LBGR2Lab)`` (L in 0–100, a, b unshifted) of a few colours, and the inverse."""
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.5, 0.7], [0.004, 0.003, 0.002], [1, 1, 1], [0, 0, 0]],
                       dtype=torch.double)
    opencv = torch.tensor([[53.240585, 80.09416, 67.20153], [87.7351, -86.18125, 83.177475],
                           [32.295673, 79.18697, -107.86175], [72.93352, -12.557894, -21.605719],
                           [2.8368156, 0.4034564, 1.5504062], [100, 0, 0], [0, 0, 0]], dtype=torch.double)
    lab = rgb_to_lab(rgb.T.reshape(1, 3, 1, 7))[0, :, 0].T  # scaled as OpenCV's 8-bit Lab, / 255
    assert torch.allclose(lab * torch.tensor([100.0, 255, 255]) - torch.tensor([0.0, 128, 128]), opencv, atol=2e-4)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 5, 7, dtype=torch.double)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-10)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x.float())), x.float(), atol=2e-6)  # float32: < 0.0005 on the 0–255 scale
    assert rgb_to_lab(x).min() >= 0 and rgb_to_lab(x).max() <= 1


def test_colour_non_local_means_is_opencvs_lab_pipeline():
    """Colour: L denoised with h, the (a, b) pair jointly with h_color, in the scaled Lab, and back; others: directly."""
    torch.manual_seed(0)
    x = (_smooth_image(3, 8) + 0.05 * torch.rand(1, 3, 8, 8)).clamp(0, 1).double()
    lab = rgb_to_lab(x)[0].numpy()
    ref_lab = np.concatenate([_nlm_reference(lab[:1], 5, 3, 3.0), _nlm_reference(lab[1:], 5, 3, 2.0)])
    ref = lab_to_rgb(torch.from_numpy(ref_lab)[None]).clamp(0, 1)
    assert torch.allclose(non_local_means(x, 5, 3, h=3.0, h_color=2.0), ref, atol=1e-9)
    assert not torch.allclose(non_local_means(x, 5, 3, h=3.0, h_color=2.0), non_local_means(x, 5, 3, h=2.0, h_color=3.0))
    gray = x[:, :1]
    assert torch.allclose(non_local_means(gray, 5, 3, 3.0), torch.from_numpy(_nlm_reference(gray[0].numpy(), 5, 3, 3.0))[None],
                          atol=1e-9)


def test_non_local_means_shape_range_and_fixed_points():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    y = non_local_means(x, 13, 3, 30.0)
    assert y.shape == x.shape and y.dtype == x.dtype and bool(torch.isfinite(y).all())
    assert y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
    for c, value in ((3, (0.2, 0.5, 0.7)), (3, (0.37,) * 3), (1, (0.37,))):  # a constant image is unchanged
        flat = torch.tensor(value).view(1, c, 1, 1).expand(2, c, 16, 16)
        assert torch.allclose(non_local_means(flat), flat, atol=2e-6)
    # h → 0: only the centre keeps a weight, so the image comes back (no two patches of x are equal)
    assert torch.allclose(non_local_means(x, 13, 3, 1e-3), x, atol=2e-6)
    assert torch.allclose(non_local_means(x[:, :1], 13, 3, 1e-3), x[:, :1], atol=1e-7)
    smooth = _smooth_image() + 0.02 * torch.randn(1, 3, 24, 24)
    change = [(non_local_means(smooth.clamp(0, 1), 7, 3, h) - smooth.clamp(0, 1)).abs().mean().item() for h in (50.0, 5.0, 1e-3)]
    assert change[0] > change[1] > change[2] and change[2] < 1e-6


def test_non_local_means_denoises_a_noisy_smooth_image():
    torch.manual_seed(0)
    clean = _smooth_image()
    for c, h in ((3, 5.0), (1, 15.0)):  # colour: h applies on the scaled Lab channels, where a smaller h suits this image
        noisy = (clean[:, :c] + 10 / 255 * torch.randn_like(clean[:, :c])).clamp(0, 1)
        before = (noisy - clean[:, :c]).square().mean().item()
        after = (non_local_means(noisy, 13, 3, h) - clean[:, :c]).square().mean().item()
        assert after < 0.5 * before


def test_non_local_means_batched_equals_one_image_at_a_time_and_is_differentiable():
    torch.manual_seed(0)
    for c in (3, 1):
        x = torch.rand(4, c, 12, 12)
        batched = non_local_means(x, 7, 3, 40.0)
        single = torch.cat([non_local_means(x[i:i + 1], 7, 3, 40.0) for i in range(4)])
        assert torch.allclose(batched, single, atol=1e-6)
    for c in (3, 2):  # the Lab path and the direct one; inside [0.2, 0.8]: away from the final clamp
        xg = (0.2 + 0.6 * torch.rand(1, c, 5, 5, dtype=torch.double)).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: non_local_means(t, 3, 3, 60.0, 40.0), (xg,))


def test_nlm_squeezer_specs_are_checked():
    assert parse_squeezer("nlm:13-3-2") == ("nlm", (13, 3, 2.0))
    assert parse_squeezer("nlm:11-3-4.5") == ("nlm", (11, 3, 4.5))
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(squeeze(x, "nlm:13-3-2"), non_local_means(x, 13, 3, 2.0))
    for bad in ("nlm", "nlm:", "nlm:13-3", "nlm:13-3-2-1", "nlm:13-3-x", "nlm:a-b-c", "nlm:13-3--2", "nlm:13-3-2.",
                "nlm: 13-3-2", "nlm:12-3-2", "nlm:13-4-2", "nlm:0-3-2", "nlm:13-3-0", "nlm:13-3-0.0", "bits:13-3-2"):
        with pytest.raises(ValueError, match="squeezer"):
            parse_squeezer(bad)
    with pytest.raises(ValueError, match="squeezer 'nlm:13-4-2'.*odd"):
        FeatureSqueezing(["bits:5", "nlm:13-4-2"])
    with pytest.raises(ValueError, match="larger than 7x7"):
        squeeze(torch.rand(1, 3, 7, 7), "nlm:13-3-2")
    for bad_args in ((12, 3, 2.0), (13, 2, 2.0), (13, 3, 0.0), (13, 3, math.inf), (13, 3, 2.0, 0.0), (13, 3, 2.0, math.nan)):
        with pytest.raises(ValueError, match="non-local means"):
            non_local_means(x, *bad_args)


def test_colour_datasets_use_the_papers_cifar10_squeezers():
    """Xu et al.: MNIST bits 1 + median 2×2; CIFAR-10 bits 5 + median 2×2 + NLM 13-3-2 (GTSRB: CIFAR-10's)."""
    assert SQUEEZERS["mnist"] == ("bits:1", "median:2")
    assert SQUEEZERS["cifar10"] == SQUEEZERS["gtsrb"] == ("bits:5", "median:2", "nlm:13-3-2")
    fs = FeatureSqueezing(SQUEEZERS["cifar10"], FixedLogits())
    assert fs.score(torch.rand(3, 3, 32, 32)).shape == (3,)


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


def test_a_bundle_variant_judges_the_same_aes_with_its_composite_verdict(tmp_path):
    clf = _tiny_classifier()
    x = torch.rand(120, 1, 28, 28)
    fs = FeatureSqueezing(["bits:1", "median:2"], clf)
    fs.calibrate(x, 0.1)
    magnet = MagNet(MagNetAutoencoder(1), ["l1"], clf)
    magnet.calibrate(x, 0.1)
    variant = MixDefense(clf, [fs, magnet])
    path = save_bundle(variant, tmp_path / "variant.pt")
    base = load_baseline("variant", path, _tiny_classifier())  # same weights, another object
    assert isinstance(base, BundleBaseline) and base.attack_model is None
    labels, margins = base.labels_and_margins(x[:40])
    verdict = variant.detect(x[:40])
    assert torch.equal(margins > 1, verdict.rejected)  # the max margin rejects exactly what the composite rejects
    assert torch.equal(labels, clf(x[:40]).argmax(1))
    assert torch.equal(margins, torch.maximum(fs.margin(x[:40]), magnet.margin(x[:40], labels)))
    with pytest.raises(ValueError, match="classifier differs"):
        load_baseline("variant", path, _tiny_classifier(1))


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

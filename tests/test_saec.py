"""SAEC: eq. 1–2, the derived rejection side, calibration, batching, state and input checks."""

from __future__ import annotations

import pytest
import torch

from mixdefense.layers.saec import (
    KERNELS,
    SAEC,
    batched_histogram,
    choose_threshold_below,
    kernel_tensor,
    pseudo_saturation,
)


def _cifar(data_root, n=64):
    from datamodules import CIFAR10DataModule

    dm = CIFAR10DataModule(data_root=str(data_root), test_subset=n)
    dm.setup("test")
    return dm.data_test.images.float() / 255


def _mnist(data_root, n=64):
    from datamodules import MNISTDataModule

    dm = MNISTDataModule(data_root=str(data_root), test_subset=n)
    dm.setup("test")
    return dm.data_test.images.float() / 255


def test_kernels_are_zero_sum_high_pass():
    for name in KERNELS:
        assert abs(kernel_tensor(name).sum().item()) < 1e-6, name


def test_pseudo_saturation_matches_eq1_naively():
    x = torch.rand(3, 3, 8, 8)
    mean = x.mean(1, keepdim=True)
    naive = ((x - mean).abs() ** 8).sum(1) ** (1 / 8)
    assert torch.allclose(pseudo_saturation(x, 8), naive, rtol=1e-4, atol=1e-6)
    naive2 = ((x - mean) ** 2).sum(1).sqrt()
    assert torch.allclose(pseudo_saturation(x, 2), naive2, rtol=1e-4, atol=1e-6)


def test_pseudo_saturation_of_gray_rgb_is_zero_and_gray_modes_differ():
    gray = torch.rand(2, 1, 8, 8)
    assert pseudo_saturation(gray.expand(-1, 3, -1, -1), 8).abs().max() < 1e-6  # up to rounding of the mean
    assert torch.equal(pseudo_saturation(gray, gray_mode="identity"), gray[:, 0])
    local = pseudo_saturation(gray, gray_mode="local_mean")
    assert local.shape == (2, 8, 8) and (local >= 0).all() and local.max() > 0


def test_batched_histogram_equals_per_image_histc():
    v = torch.randn(16, 500) * 0.2
    v[0, :5] = torch.tensor([-0.5, -0.25, 0.25, 0.5, 0.0])  # edges and out-of-range values
    for bins, lo, hi in ((64, -0.25, 0.25), (7, -0.1, 0.3)):
        batched = batched_histogram(v, bins, lo, hi)
        reference = torch.stack([torch.histc(row, bins=bins, min=lo, max=hi) for row in v])
        assert torch.equal(batched, reference)


def test_rejection_side_follows_from_eq2():
    """A concentrated histogram has a larger variance of bin counts than a flat one."""
    saec = SAEC(bins=16, value_range=0.25)
    concentrated = torch.zeros(1, 16)
    concentrated[0, 8] = 1.0
    flat = torch.full((1, 16), 1 / 16)
    assert concentrated.var(1, unbiased=False) > flat.var(1, unbiased=False)
    # a flat (constant) image concentrates every residual in one bin: the largest score
    const = torch.full((1, 3, 16, 16), 0.5)
    noisy = (const + torch.empty_like(const).uniform_(-0.2, 0.2)).clamp(0, 1)
    assert saec.score(const) > saec.score(noisy)
    assert int(saec.direction) == -1  # reject when score < threshold


@pytest.mark.parametrize("channels", [1, 3])
def test_score_is_invariant_to_a_constant_brightness_shift(channels):
    # x_c − x_mean (RGB) and x − box3(x) (gray) cancel a constant; the kernel is zero-sum
    x = 0.25 + 0.5 * torch.rand(8, channels, 32, 32)
    saec = SAEC()
    for mode in (("local_mean", "identity") if channels == 1 else ("local_mean",)):
        saec = SAEC(gray_mode=mode)
        h0, h1 = saec.histogram(x), saec.histogram(x + 0.125)
        moved = (h0 - h1).abs().sum(1) * saec.noise_contrast(x)[0].numel() / 2
        assert (moved <= 2).all(), moved  # at most a rounding-level pixel changes its bin
        assert torch.allclose(saec.score(x), saec.score(x + 0.125), rtol=1e-3)


@pytest.mark.parametrize("loader", ["cifar", "mnist"])
def test_growing_uniform_noise_moves_scores_toward_rejection(data_root, loader):
    x = _cifar(data_root) if loader == "cifar" else _mnist(data_root)
    saec = SAEC()
    gen = torch.Generator().manual_seed(0)
    amplitudes = [0, 2, 4, 8, 16, 32, 64, 128, 255]
    noise = 2 * torch.rand(x.shape, generator=gen) - 1
    means = [saec.score((x + noise * a / 255).clamp(0, 1)).mean().item() for a in amplitudes]
    assert all(b < a for a, b in zip(means, means[1:])), means  # strictly decreasing: no sag at large amplitude


def test_calibration_respects_the_clean_bound_and_saves_its_result(data_root):
    x = _cifar(data_root, n=400)
    saec = SAEC()
    cal = saec.calibrate(x, noise=(8 / 255, 64 / 255), max_clean_rejection=0.02)
    assert cal.clean_rejection_rate <= 0.02
    assert (saec(x).float().mean().item()) <= 0.02
    assert cal.noisy_detection_rate > 0.9 and cal.auroc > 0.95
    assert cal.num_clean == cal.num_noisy == 400
    assert saec.calibration().as_dict() == pytest.approx(cal.as_dict())


def test_calibration_accepts_a_dataloader_of_pairs(data_root):
    x = _cifar(data_root, n=200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(200, dtype=torch.long)), batch_size=64)
    a, b = SAEC(), SAEC()
    assert a.calibrate(loader).threshold == b.calibrate(x, batch_size=64).threshold  # same noise draws


def test_choose_threshold_below_on_hand_made_scores():
    clean = torch.tensor([5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0], dtype=torch.float64)
    noisy = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.5, 6.5, 20.0], dtype=torch.float64)
    t, frr, tpr = choose_threshold_below(clean, noisy, max_clean_rejection=0.0)
    assert t == pytest.approx(4.5) and frr == 0.0 and tpr == pytest.approx(4 / 7)
    t, frr, tpr = choose_threshold_below(clean, noisy, max_clean_rejection=0.2)
    # 6.75 would reject 2 clean (0.2) and 6 noisy: gain 6/7 − 0.2 > 4/7
    assert t == pytest.approx(6.75) and frr == pytest.approx(0.2) and tpr == pytest.approx(6 / 7)


def test_state_round_trips_through_state_dict(data_root):
    x = _cifar(data_root, n=100)
    a = SAEC(p=4, kernel="kb", bins=32, value_range=0.1)
    a.calibrate(x)
    b = SAEC()
    b.load_state_dict(a.state_dict())
    assert b.settings() == a.settings()
    assert float(b.threshold) == float(a.threshold)
    assert torch.equal(a.score(x), b.score(x)) and torch.equal(a(x), b(x))
    assert b.calibration().as_dict() == pytest.approx(a.calibration().as_dict())
    g = SAEC(gray_mode="identity")
    h = SAEC()
    h.load_state_dict(g.state_dict())
    assert h.gray_mode == "identity"


BAD = [
    (torch.rand(3, 32, 32), "4-D"),
    (torch.rand(0, 3, 32, 32), "empty batch"),
    (torch.randint(0, 255, (1, 3, 32, 32)), "floating-point"),
    (torch.rand(1, 2, 32, 32), "channel"),
    (torch.rand(1, 3, 32, 32) * 2, r"\[0, 1\]"),
    (torch.rand(1, 3, 32, 32) - 0.5, r"\[0, 1\]"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (torch.full((1, 3, 32, 32), float("inf")), "NaN or Inf"),
    ([[0.5]], "torch.Tensor"),
]


@pytest.mark.parametrize("x,match", BAD)
def test_bad_inputs_raise_clear_errors(x, match):
    with pytest.raises(ValueError, match=match):
        SAEC().score(x)


def test_forward_before_calibration_and_bad_settings():
    with pytest.raises(RuntimeError, match="not calibrated"):
        SAEC()(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="kernel"):
        SAEC(kernel="sobel")
    with pytest.raises(ValueError, match="bins"):
        SAEC(bins=1)
    with pytest.raises(ValueError, match="gray_mode"):
        SAEC(gray_mode="hsv")
    with pytest.raises(ValueError, match="noise"):
        SAEC().calibrate(torch.rand(4, 3, 8, 8), noise=(0.1, 0.05))

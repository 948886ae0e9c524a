"""SAEC's optional luminance test (issue 23): the statistics, their joint calibration, the option's wiring.

Synthetic tensors only (fast); the benchmark on real data is ``benchmarks/saec_luminance.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixdefense.layers import luminance as lum
from mixdefense.layers.saec import SAEC, batched_histogram, high_pass, kernel_tensor

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (see conftest)

#: the state_dict keys of the paper's SAEC (what every file written before the option holds)
PAPER_KEYS = ["kernel", "p", "bins", "value_range", "gray_local_mean", "threshold", "direction", "calibration_stats"]
PAPER_SETTINGS = ["p", "kernel", "bins", "value_range", "gray_mode"]


def scenes(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """``n`` RGB scenes ``[n, 3, size, size]`` in [0.2, 0.8]: a smooth coloured background (flat
    areas) with a textured square (a "sign on foliage"), no saturated pixel."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    x = 0.3 + 0.4 * base
    q = size // 4
    x[:, :, q:3 * q, q:3 * q] += 0.1 * (torch.rand(n, 1, 2 * q, 2 * q, generator=g) - 0.5)  # texture, tied
    return x.clamp(0.2, 0.8)


def tied_noise(x: torch.Tensor, amplitude: float, seed: int = 1) -> torch.Tensor:
    """``clip(x + u·1)``: one uniform ``u ∈ [−amplitude, amplitude]`` per pixel, the same in every channel."""
    g = torch.Generator().manual_seed(seed)
    u = 2 * torch.rand((x.shape[0], 1, *x.shape[2:]), generator=g) - 1
    return (x + amplitude * u).clamp(0, 1)


# -- the statistics ----------------------------------------------------------------------------------
def test_luminance_is_the_channel_mean_and_ignores_chroma():
    x = scenes(4)
    assert torch.allclose(lum.luminance(x), x.mean(1))
    # moving colour between channels at a constant mean changes no statistic (the paper's test sees chroma)
    d = 0.05 * torch.sign(torch.randn(4, 1, 32, 32))
    recoloured = x + torch.cat([d, -d, torch.zeros_like(d)], 1)
    assert torch.allclose(lum.luminance_statistics(x), lum.luminance_statistics(recoloured), rtol=1e-4, atol=1e-6)


def test_patch_covariance_is_the_covariance_of_the_patches():
    g = lum.luminance(scenes(3))
    cov = lum.patch_covariance(g)
    for i in range(3):
        patches = torch.stack([g[i, r:r + 5, c:c + 5].flatten() for r in range(28) for c in range(28)]).double()
        assert torch.allclose(cov[i], torch.cov(patches.T, correction=0), atol=1e-12)


def test_statistics_ignore_a_constant_brightness_shift():
    x = scenes(6)
    shifted = x + 0.125  # every channel, no pixel saturates
    a, b = lum.luminance_statistics(x), lum.luminance_statistics(shifted)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a, b)
    flat = torch.full((2, 3, 16, 16), 0.4)
    assert torch.equal(lum.luminance_statistics(flat), lum.luminance_statistics(flat + 0.25))
    assert (lum.luminance_statistics(flat)[:, :2] < 1e-6).all()  # no noise in a flat image


@pytest.mark.parametrize("column", [0, 1])
def test_noise_levels_grow_with_channel_tied_noise(column):
    x = scenes(8)
    amplitudes = [0, 2, 4, 8, 16, 32]
    stats = torch.stack([lum.luminance_statistics(tied_noise(x, a / 255))[:, column] for a in amplitudes])
    assert (stats[1:] > stats[:-1]).all(), stats  # on every image, at every step


def test_noise_levels_estimate_sigma_of_pure_noise():
    x = tied_noise(torch.full((4, 3, 64, 64), 0.5), 16 / 255)  # uniform: σ = a/√3
    sigma = 16 / 255 / 3 ** 0.5
    flat = lum.flat_noise_level(x, 1.0)  # Donoho's MAD on the whole image
    assert torch.allclose(flat, torch.full_like(flat, sigma), rtol=0.15), flat / sigma
    pca = lum.global_noise_level(x)  # the smallest sample eigenvalue sits a little below σ²
    assert ((pca > 0.6 * sigma) & (pca < sigma)).all(), pca / sigma


def test_flat_level_keeps_texture_out_and_the_naive_level_does_not():
    g = torch.Generator().manual_seed(4)
    x = torch.full((4, 3, 32, 32), 0.5)
    x[:, :, :, 8:] += 0.2 * (torch.rand(4, 1, 32, 24, generator=g) - 0.5)  # 3/4 texture, 1/4 flat
    flat, whole, naive = lum.flat_noise_level(x, 0.1), lum.flat_noise_level(x, 1.0), lum.mad_noise_level(x)
    assert (flat < 1e-6).all() and (whole > 0.01).all() and (naive > 0.01).all()
    noisy = tied_noise(x, 8 / 255)  # σ = 8/255/√3 ≈ 0.018
    assert (lum.flat_noise_level(noisy, 0.1) > 0.01).all()


def test_clip_speckle_counts_isolated_saturated_pixels():
    x = torch.full((1, 3, 16, 16), 0.5)
    x[:, :, 4:12, 4:12] = 1.0  # a saturated square: contiguous, corners included
    assert lum.clip_speckle(x).item() == 0.0
    x[:, :, 0, 15] = 0.0  # one black dot in a corner (replicated borders: 2 outside neighbours are itself)
    x[:, :, 14, 2] = 1.0  # one white dot
    x[:, 0, 14, 6] = 1.0  # not every channel: not saturated
    assert lum.clip_speckle(x).item() == pytest.approx(1 / 256)  # the corner dot has 2 "saturated" neighbours
    white = torch.ones(1, 3, 32, 32)
    assert lum.clip_speckle(white).item() == 0.0
    assert lum.clip_speckle(tied_noise(white, 16 / 255)).item() > 0.1  # half the pixels stay at 1, scattered


def test_batched_equals_per_image():
    x = torch.cat([scenes(5), tied_noise(scenes(3, seed=2), 8 / 255), torch.ones(1, 3, 32, 32)])
    x[-1, :, ::3, ::2] = 0.5
    batched = lum.luminance_statistics(x)
    single = torch.cat([lum.luminance_statistics(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(batched[:, 1:], single[:, 1:])  # sorting / counting: exactly
    assert torch.allclose(batched[:, 0], single[:, 0], rtol=1e-6, atol=1e-9)  # batched matmul
    assert torch.equal(lum.luminance_statistics(x), batched)  # deterministic


def test_statistics_check_their_inputs():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        lum.luminance_statistics(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="at least 5"):
        lum.global_noise_level(torch.rand(1, 3, 4, 8))
    with pytest.raises(ValueError, match="fraction"):
        lum.flat_noise_level(torch.rand(1, 3, 8, 8), 0.0)


def test_allocate_thresholds_spends_the_budget_where_it_catches_most():
    clean = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9],     # test 0: noisy copies sit just above clean
                          [9.0, 8, 7, 6, 5, 4, 3, 2, 1, 0]])    # test 1: noisy copies sit inside clean
    noisy = torch.tensor([[8.5, 8.6, 8.7, 20, 20, 20],
                          [0.0, 0, 0, 0, 0, 8.5]])
    cuts, ks = lum.allocate_thresholds(clean, noisy, budget=2, required=(0, 1))  # 2 units: the two cuts
    assert ks == [0, 0] and torch.equal(cuts, torch.tensor([9.0, 9.0], dtype=torch.float64))
    cuts, ks = lum.allocate_thresholds(clean, noisy, budget=3, required=(0, 1))  # one image to spend
    assert ks == [1, 0] and cuts[0] == pytest.approx(8.5) and cuts[1] == pytest.approx(9.0)
    assert int((clean > cuts[:, None]).any(0).sum()) <= 1
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        lum.allocate_thresholds(clean[0], noisy, 1)
    with pytest.raises(ValueError, match="required"):
        lum.allocate_thresholds(clean, noisy, 1, required=(2,))


def test_clean_budget_counts_fresh_images():
    assert lum.clean_budget(0.005, 2000) == 10 and lum.clean_budget(0.01, 10000) == 100
    assert lum.clean_budget(0.005, 1999) == 10 and lum.clean_budget(0.005, 1998) == 9
    with pytest.raises(ValueError, match="max_clean_rejection"):
        lum.clean_budget(1.0, 10)


def test_allocation_charges_each_active_cut_and_leaves_useless_tests_off():
    clean = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                          [0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    noisy = torch.tensor([[20.0, 20, 7.2, 0],     # test 0 catches two copies at its clean maximum
                          [0.0, 0, 0, 8.7]])      # test 1 catches one copy, only after rejecting one image
    cuts, ks = lum.allocate_thresholds(clean, noisy, budget=1)
    assert ks == [0, lum.OFF] and cuts[1] == float("inf")  # the one unit buys test 0's two copies
    cuts, ks = lum.allocate_thresholds(clean, noisy, budget=3)
    assert ks == [0, 1] and cuts[1] == pytest.approx(8.5)  # 3 units: two cuts and one image
    assert int((clean > cuts[:, None]).any(0).sum()) + sum(k != lum.OFF for k in ks) <= 3
    cuts, ks = lum.allocate_thresholds(clean, noisy, budget=0, required=(1,))
    assert ks == [lum.OFF, 0]  # required tests are on even when the budget is spent


# -- the option in SAEC ----------------------------------------------------------------------------------
def _paper_features(x: torch.Tensor, saec: SAEC) -> torch.Tensor:
    """Eq. 1 and the high-pass filter written out per image (p-norm over channels, valid filter) → ``[B, N]``."""
    out = []
    for img in x:
        d = img - img.mean(0, keepdim=True)
        sat = (d.abs() ** float(saec.p)).sum(0) ** (1 / float(saec.p))
        out.append(high_pass(sat[None], kernel_tensor(saec.kernel_name))[0].flatten())
    return torch.stack(out)


def _paper_scores(feat: torch.Tensor, saec: SAEC) -> torch.Tensor:
    """Eq. 2 written out per image on given features ``[B, N]``: histc, then the histogram's variance."""
    r = float(saec.value_range)
    return torch.stack([(torch.histc(f, bins=int(saec.bins), min=-r, max=r) / f.numel()).var(unbiased=False) for f in feat])


def test_option_off_is_the_paper_saec():
    x = torch.cat([scenes(4), tied_noise(scenes(4, seed=3), 16 / 255), torch.rand(4, 3, 32, 32)])
    for settings in ({}, {"bins": 32, "value_range": 0.02}, {"kernel": "kb", "p": 2.0}):
        off, on = SAEC(**settings), SAEC(**settings, luminance=True)
        assert list(off.state_dict()) == PAPER_KEYS and list(off.settings()) == PAPER_SETTINGS
        assert not off.luminance and on.luminance
        # compared in two steps: a residual within float rounding of a bin edge (flat regions of these scenes give
        # residuals of exactly 0, an edge) may fall in either neighbouring bin on another CPU's kernels
        feat = off.noise_contrast(x).flatten(1)
        assert torch.allclose(feat, _paper_features(x, off), rtol=1e-5, atol=1e-7)
        assert torch.allclose(off.score(x), _paper_scores(feat, off), rtol=1e-5, atol=1e-9)
        assert torch.equal(on.score(x), off.score(x))  # the option never touches NL
    assert torch.equal(batched_histogram(torch.zeros(1, 4), 4, -1.0, 1.0), torch.tensor([[0.0, 0, 4, 0]]))


def test_option_off_decides_as_before():
    x = torch.cat([scenes(4), tied_noise(scenes(4, seed=3), 32 / 255)])
    saec = SAEC()
    saec.threshold.fill_(float(saec.score(x).median()))
    s = saec.score(x)
    assert torch.equal(saec(x), s < saec.threshold)
    assert torch.equal(saec.margin(x), saec.threshold / s.clamp_min(torch.finfo(torch.float32).tiny))
    with pytest.raises(RuntimeError, match="no luminance test"):
        saec.luminance_scores(x)
    assert saec.luminance_calibration() is None


def test_luminance_test_catches_channel_tied_noise_the_paper_test_misses():
    clean = scenes(200, seed=5)
    saec = SAEC(bins=32, value_range=0.02, luminance=True)
    cal = saec.calibrate(clean, noise=(4 / 255, 64 / 255), max_clean_rejection=0.01)
    joint = saec.luminance_calibration()
    assert joint is not None and joint.clean_rejection_rate <= 0.01 and set(joint.thresholds) == set(lum.STATISTICS)
    assert joint.clean_rejections["paper"] >= 0 and cal.threshold == float(saec.threshold)  # the paper's test stays on
    assert sum(k + 1 for k in joint.clean_rejections.values()) <= 2  # budget ⌊1 % · 201⌋: a unit per active cut
    fresh = scenes(100, seed=6)
    tied = tied_noise(fresh, 16 / 255, seed=7)
    paper = SAEC(bins=32, value_range=0.02)
    paper.calibrate(clean, noise=(4 / 255, 64 / 255), max_clean_rejection=0.01)
    assert paper(tied).float().mean() < 0.2  # eq. 1 cancels channel-tied noise
    assert saec(tied).float().mean() > 0.95
    assert saec(fresh).float().mean() <= 0.03
    assert torch.equal(saec(tied), saec.margin(tied) > 1)
    assert torch.equal(saec(fresh), saec.margin(fresh) > 1)


def test_paper_copies_do_not_change_when_the_option_is_on():
    """The option draws its channel-tied copies from its own generator: the paper test's scores of
    its noisy copies (and so its AUROC) are those of the paper's calibration."""
    clean = scenes(60, seed=8)
    a, b = SAEC(), SAEC(luminance=True)
    sa, sb = a.calibration_scores(clean, batch_size=20), b.calibration_scores(clean, batch_size=20)  # 3 batches
    assert torch.equal(sa.clean, sb.clean) and torch.equal(sa.noisy, sb.noisy)
    assert a.calibrate(clean, max_clean_rejection=0.05, batch_size=20).auroc == \
        b.calibrate(clean, max_clean_rejection=0.05, batch_size=20).auroc


def test_scoring_once_then_choosing_per_budget_is_calibrate():
    clean = torch.cat([scenes(80, seed=10), tied_noise(scenes(20, seed=11), 4 / 255)])  # a noisy clean tail
    scored = SAEC(luminance=True)
    scores = scored.calibration_scores(clean, max_images=None)
    for budget in (0.0, 0.03, 0.1):
        direct = SAEC(luminance=True)
        cal = direct.calibrate(clean, max_clean_rejection=budget, max_images=None)
        assert scored.calibrate_from_scores(scores, budget) == cal
        assert scored.luminance_calibration() == direct.luminance_calibration()
        assert scored.luminance_calibration().clean_rejection_rate <= budget
    with pytest.raises(ValueError, match="disagree"):
        SAEC().calibrate_from_scores(scores)


def test_luminance_saec_round_trips_through_its_file_and_state(tmp_path):
    clean = scenes(120, seed=9)
    a = SAEC(bins=32, value_range=0.02, luminance=True, luminance_fraction=0.2)
    a.calibrate(clean, max_clean_rejection=0.02)
    path = a.save(tmp_path / "saec_plus.pt", dataset="synthetic")
    b = SAEC.load(path)
    x = torch.cat([clean[:8], tied_noise(clean[:8], 16 / 255)])
    assert b.luminance and b.settings() == a.settings() and b.settings()["luminance_fraction"] == pytest.approx(0.2)
    assert torch.equal(b.luminance_thresholds, a.luminance_thresholds) and float(b.threshold) == float(a.threshold)
    assert torch.equal(a(x), b(x)) and torch.equal(a.margin(x), b.margin(x))
    assert b.luminance_calibration() == a.luminance_calibration()
    # the state decides: a paper SAEC takes a luminance state and the other way round
    c = SAEC()
    c.load_state_dict(a.state_dict())
    assert c.luminance and torch.equal(c(x), a(x))
    paper = SAEC()
    paper.calibrate(clean, max_clean_rejection=0.02)
    d = SAEC(luminance=True)
    d.load_state_dict(paper.state_dict())
    assert not d.luminance and list(d.state_dict()) == PAPER_KEYS and torch.equal(d(x), paper(x))


@pytest.mark.parametrize("dataset", ["cifar10", "gtsrb", "mnist"])
def test_shipped_saec_files_still_load_as_paper_layers(dataset):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / f"artifacts/{dataset}/saec.pt"
    if not path.exists():
        pytest.skip(f"{path} not shipped in this checkout")
    saec = SAEC.load(path)
    assert not saec.luminance and list(saec.state_dict()) == PAPER_KEYS and saec.calibrated
    x = torch.rand(4, 1 if dataset == "mnist" else 3, 28, 28)
    assert torch.equal(saec(x), saec.score(x) < saec.threshold)


def test_bad_luminance_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="luminance_fraction"):
        SAEC(luminance=True, luminance_fraction=1.5)
    with pytest.raises(ValueError, match="luminance must be"):
        SAEC(luminance="yes")
    with pytest.raises(ValueError, match="at least"):
        SAEC(kernel="kb", luminance=True).score(torch.rand(1, 3, 4, 4))


def test_saec_command_calibrates_a_luminance_candidate(tmp_path):
    """``mixdefense saec calibrate --config <yaml> saec.luminance=true ...``: the config takes the option, the
    candidate file holds it and the report records the joint calibration (synthetic images, no dataset)."""
    import json

    from mixdefense.commands import saec as command

    config = tmp_path / "saec.yaml"
    config.write_text("dataset: synthetic\nsaec: {p: 8, kernel: kv, bins: 32, value_range: 0.02, luminance: false}\n"
                      "calibration: {num_images: 120, noise: [0.0156862745, 0.2509803922], max_clean_rejection: 0.02, seed: 0}\n"
                      f"output: {{layer: {tmp_path}/saec_plus.pt, report_dir: {tmp_path}/report}}\n"
                      "evaluation: {num_clean_test: 30}\n")
    seen = []

    def load_images(dataset, split, n, seed=0):
        seen.append(split)
        x = scenes(n or 30, seed=12 if split == "train" else 13)
        return x, torch.zeros(len(x), dtype=torch.long)

    cfg = command.load_config(str(config), ["saec.luminance=true", "saec.luminance_fraction=0.2"])
    report = command.calibrate(cfg, load_images)
    layer = SAEC.load(tmp_path / "saec_plus.pt")
    assert layer.luminance and layer.settings()["luminance_fraction"] == pytest.approx(0.2) and layer.calibrated
    saved = json.loads((tmp_path / "report" / "saec_calibration.json").read_text())
    assert saved["luminance"] == report["luminance"] and set(saved["luminance"]["thresholds"]) == set(lum.STATISTICS)
    assert "luminance" in saved["rule"] and saved["settings"]["luminance"] is True and seen[0] == "train"
    paper = command.calibrate(command.load_config(str(config), []), load_images)  # the option off: the paper's report
    assert "luminance" not in paper and "luminance" not in paper["settings"]
    with pytest.raises(ValueError, match="unknown saec setting"):
        command.load_config(str(config), ["saec.luminance_typo=1"])

"""Property tests (hypothesis) for SAEC and the metric formulas on random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixdefense.layers.saec import SAEC, batched_histogram
from mixdefense.metrics import (
    acc_detector,
    acc_robust_classifier,
    detection_auroc,
    tpr_at_fpr,
)

bools = st.lists(st.booleans(), min_size=1, max_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (see conftest)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.sampled_from([1, 3]), size=st.integers(8, 20),
       bins=st.integers(2, 96), rng=st.floats(0.01, 1.0))
def test_saec_score_is_bounded_and_histogram_conserves_mass(seed, channels, size, bins, rng):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, channels, size, size, generator=g)
    saec = SAEC(bins=bins, value_range=rng)
    h = saec.histogram(x)
    assert (h >= 0).all() and (h.sum(1) <= 1 + 1e-5).all()
    s = saec.score(x)
    # variance of L fractions summing to at most 1 is at most (1/L)(1 − 1/L)
    assert (s >= 0).all() and (s <= (1 / bins) * (1 - 1 / bins) + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bins=st.integers(1, 50), lo=st.floats(-2, 0), width=st.floats(0.01, 3))
def test_batched_histogram_matches_histc(seed, bins, lo, width):
    v = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed))
    hi = lo + width
    ref = torch.stack([torch.histc(r, bins=bins, min=lo, max=hi) for r in v])
    assert torch.equal(batched_histogram(v, bins, lo, hi), ref)


@given(clean=bools, adv=bools)
def test_acc_detector_matches_counts(clean, adv):
    c, a = torch.tensor(clean), torch.tensor(adv)
    expected = (sum(not r for r in clean) + sum(adv)) / (len(clean) + len(adv))
    assert abs(acc_detector(c, a) - expected) < 1e-12
    assert 0.0 <= acc_detector(c, a) <= 1.0


@given(data=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=64))
def test_acc_rc_matches_counts(data):
    r = torch.tensor([d[0] for d in data])
    ok = torch.tensor([d[1] for d in data])
    expected = sum(a or b for a, b in data) / len(data)
    assert abs(acc_robust_classifier(r, ok) - expected) < 1e-6


# -- SAEC: more properties ---------------------------------------------------------------------
def _image(seed: int, channels: int, h: int, w: int, kind: str) -> torch.Tensor:
    """A valid image batch [2, C, H, W] in [0, 1] of a given kind (smooth, noisy, binary, constant)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "constant":
        return torch.rand(2, 1, 1, 1, generator=g).expand(2, channels, h, w).clone()
    if kind == "binary":
        return (torch.rand(2, channels, h, w, generator=g) > 0.5).float()
    x = torch.rand(2, channels, h, w, generator=g)
    if kind == "smooth":
        x = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return x


kinds = st.sampled_from(["random", "smooth", "binary", "constant"])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.sampled_from([1, 3]), h=st.integers(5, 24), w=st.integers(5, 24),
       kind=kinds, kernel=st.sampled_from(["kv", "kb", "second_order"]), p=st.sampled_from([1.0, 2.0, 8.0, 16.0]),
       gray=st.sampled_from(["local_mean", "identity"]))
def test_saec_score_is_finite_for_any_valid_image(seed, channels, h, w, kind, kernel, p, gray):
    x = _image(seed, channels, h, w, kind)
    s = SAEC(p=p, kernel=kernel, gray_mode=gray).score(x)
    assert s.shape == (2,) and torch.isfinite(s).all() and (s >= 0).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), size=st.integers(8, 24), shift=st.floats(-0.4, 0.4), kind=kinds,
       bins=st.integers(8, 96), rng=st.floats(0.02, 0.5))
def test_saec_ignores_a_brightness_shift_common_to_all_channels(seed, size, shift, kind, bins, rng):
    """Eq. 1 subtracts the per-pixel channel mean, so adding the same constant to every channel of
    an RGB image (values kept in [0, 1]) leaves the noise-contrast map unchanged up to float
    rounding; the score then changes only through residuals that rounding moves across a bin edge
    (or out of the histogram's range), by at most ``4/(L·N)`` per such residual (``N`` residuals, ``L``
    bins).  The moved residuals are counted on the two histograms themselves: a residual on a bin edge
    (binary images put many there) can land on either side in another convolution call."""
    x = _image(seed, 3, size, size, kind) * (1 - abs(shift)) + max(0.0, -shift)  # room for the shift
    y = x + shift
    assert 0 <= y.min() and y.max() <= 1
    saec = SAEC(bins=bins, value_range=rng)
    fx, fy = saec.noise_contrast(x), saec.noise_contrast(y)
    torch.testing.assert_close(fx, fy, atol=2e-5, rtol=0)
    n = fx[0].numel()
    moved = ((saec.histogram(x) - saec.histogram(y)).abs().sum(1) * n).round().double()  # count changes, both ends
    assert ((saec.score(x) - saec.score(y)).abs().double() <= 4 * moved / (bins * n) + 1e-7).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.sampled_from([1, 3]), kind=kinds, pick=st.integers(0, 7),
       offset=st.sampled_from(["below", "at", "above", "scaled"]), scale=st.floats(0.01, 100.0))
def test_saec_margin_above_one_exactly_where_rejected(seed, channels, kind, pick, offset, scale):
    x = torch.cat([_image(seed + i, channels, 16, 16, kind) for i in range(4)])
    saec = SAEC()
    s = saec.score(x)
    t = s[pick]
    t = {"below": torch.nextafter(t, torch.tensor(-1.0)), "at": t, "above": torch.nextafter(t, torch.tensor(2.0)),
         "scaled": t * scale}[offset]
    saec.threshold.fill_(float(t))
    assert torch.equal(saec.margin(x) > 1, saec(x))
    assert torch.equal(saec(x), s < t)


# -- metrics: more properties -------------------------------------------------------------------
scores = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None)
@given(clean=scores, adv=scores)
def test_auroc_is_a_probability_and_swapping_roles_complements_it(clean, adv):
    c, a = torch.tensor(clean), torch.tensor(adv)
    auc = detection_auroc(c, a)
    assert 0.0 <= auc <= 1.0
    assert abs(auc + detection_auroc(a, c) - 1.0) < 1e-6  # P(a > c) + ½P(tie) and its complement
    assert abs(detection_auroc(-c, -a) - (1.0 - auc)) < 1e-6  # flipping the score's sign
    # the definition, by counting pairs
    pairs = (a[:, None] > c[None, :]).double().mean() + 0.5 * (a[:, None] == c[None, :]).double().mean()
    assert abs(auc - float(pairs)) < 1e-6


@settings(max_examples=60, deadline=None)
@given(clean=scores, adv=scores, fprs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=6))
def test_tpr_at_fpr_is_monotone_in_fpr_and_a_rate(clean, adv, fprs):
    c, a = torch.tensor(clean), torch.tensor(adv)
    tprs = [tpr_at_fpr(c, a, f) for f in sorted(fprs)]
    assert all(0.0 <= t <= 1.0 for t in tprs)
    assert all(x <= y + 1e-12 for x, y in zip(tprs, tprs[1:]))
    assert tpr_at_fpr(c, a, 1.0) == 1.0
    # at FPR 0 the threshold sits above every clean score: the AEs scoring above all of them
    assert abs(tpr_at_fpr(c, a, 0.0) - float((a > c.max()).double().mean())) < 1e-6


@given(clean=bools, adv=bools)
def test_acc_detector_count_identities(clean, adv):
    c, a = torch.tensor(clean), torch.tensor(adv)
    acc = acc_detector(c, a)
    assert abs(acc + acc_detector(~c, ~a) - 1.0) < 1e-12  # flipping every decision flips every count
    assert acc_detector(c.flip(0), a.flip(0)) == acc  # order does not matter
    # on a half/half mixture (eq. 7's reading) it is the mean of clean acceptance and AE detection
    half = min(len(clean), len(adv))
    c2, a2 = c[:half], a[:half]
    mean = 0.5 * ((~c2).double().mean() + a2.double().mean())
    assert abs(acc_detector(c2, a2) - float(mean)) < 1e-12
    # pooling two batches weights their accuracies by size
    both = acc_detector(torch.cat([c, c2]), torch.cat([a, a2]))
    n1, n2 = len(clean) + len(adv), 2 * half
    assert abs(both - (acc * n1 + acc_detector(c2, a2) * n2) / (n1 + n2)) < 1e-12

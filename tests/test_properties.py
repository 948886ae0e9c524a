"""Property tests (hypothesis) for SAEC and the metric formulas on random inputs."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixdefense.metrics import acc_detector, acc_robust_classifier
from mixdefense.saec import SAEC, batched_histogram

bools = st.lists(st.booleans(), min_size=1, max_size=64)


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

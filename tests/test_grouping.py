"""mixdefense.grouping: near-duplicate groups and splits of whole groups (tiny synthetic tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from mixdefense.grouping import (
    group_split,
    groups_from_edges,
    near_duplicate_groups,
    thumbnails,
)


def _signs(n_signs: int, copies: int, noise: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images uint8 [n_signs * copies, 3, 16, 16], sign id)``: each sign a random image, copies with small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n_signs, 3, 4, 4, generator=g).mul(255).repeat_interleave(4, 2).repeat_interleave(4, 3)
    x = base.repeat_interleave(copies, 0) + noise * torch.randn(n_signs * copies, 3, 16, 16, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), torch.arange(n_signs).repeat_interleave(copies)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when group ids ``a`` and ``b`` put the same images together."""
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def test_thumbnails_shapes_scaling_and_normalisation():
    x, _ = _signs(3, 2)
    raw = thumbnails(x, size=4)
    assert raw.shape == (6, 48) and raw.dtype == torch.float32
    assert torch.allclose(raw, thumbnails(x.float() / 255, size=4), atol=1e-6)  # uint8 is scaled to [0, 1]
    assert thumbnails(x, size=8, colour=False).shape == (6, 64)
    z = thumbnails(torch.cat([x, torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)]), size=8, normalise=True)
    assert torch.allclose(z[:-1].mean(1), torch.zeros(6), atol=1e-6)
    assert torch.allclose(z[:-1].norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(z[-1], torch.zeros(z.shape[1]))  # a constant image has no pattern
    with pytest.raises(ValueError, match="N, C, H, W"):
        thumbnails(x[0])


def test_near_copies_of_the_same_label_are_grouped():
    x, sign = _signs(4, 5)
    labels = torch.zeros(len(sign), dtype=torch.long)
    g = near_duplicate_groups(x, labels, 0.2, neighbours=None, max_group=None)
    assert _same_partition(g, sign)
    g = near_duplicate_groups(x, labels, neighbours=3)  # the default rule: links to the nearest images
    assert _same_partition(g, sign)
    assert g.dtype == torch.long and g.tolist()[:6] == [0, 0, 0, 0, 0, 1]  # ids in order of first appearance


def test_different_labels_are_never_grouped():
    x, _ = _signs(1, 6)
    x = x[:1].repeat(6, 1, 1, 1)  # six identical images
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for kw in ({"threshold": math.inf, "neighbours": None, "max_group": None}, {"neighbours": 5}):
        g = near_duplicate_groups(x, labels, **kw)
        assert _same_partition(g, labels)


def test_links_are_transitive_chains():
    desc = torch.tensor([[0.0], [1.0], [1.9], [2.7], [3.4], [10.0], [10.5]])  # gaps 1, 0.9, 0.8, 0.7
    labels = torch.zeros(7, dtype=torch.long)
    g = near_duplicate_groups(None, labels, 1.0, neighbours=None, max_group=None, descriptors=desc)
    assert g.tolist() == [0, 0, 0, 0, 0, 1, 1]  # 0 and 3.4 are far apart, joined through the chain
    g = near_duplicate_groups(None, labels, 0.75, neighbours=None, max_group=None, descriptors=desc)
    assert g.tolist() == [0, 1, 2, 3, 3, 4, 4]
    g = near_duplicate_groups(None, labels, neighbours=1, descriptors=desc)  # nearest neighbour links chain too
    assert g.tolist() == [0, 0, 0, 0, 0, 1, 1]
    # the chain crosses no label boundary
    g = near_duplicate_groups(None, torch.tensor([0, 0, 1, 1, 1, 2, 2]), 1.0, neighbours=None, max_group=None,
                              descriptors=desc)
    assert g.tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_blocks_and_cap():
    x, sign = _signs(5, 6, noise=6.0, seed=1)
    labels = sign % 2
    full = near_duplicate_groups(x, labels, 0.3, neighbours=None, max_group=None, chunk=1024)
    assert torch.equal(full, near_duplicate_groups(x, labels, 0.3, neighbours=None, max_group=None, chunk=4))
    assert torch.equal(near_duplicate_groups(x, labels, chunk=1024), near_duplicate_groups(x, labels, chunk=3))
    desc = torch.arange(8.0)[:, None]
    capped = near_duplicate_groups(None, torch.zeros(8, dtype=torch.long), 1.0, neighbours=2, max_group=3,
                                   descriptors=desc)
    assert torch.bincount(capped).max() <= 3 and len(capped.unique()) == 3
    frac = near_duplicate_groups(None, torch.zeros(8, dtype=torch.long), neighbours=2, max_group=0.25,
                                 descriptors=desc)
    assert torch.bincount(frac).max() <= 2
    with pytest.raises(ValueError, match="labels"):
        near_duplicate_groups(x, labels[:-1])
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_groups(x, labels, -1.0)
    with pytest.raises(ValueError, match="max_group"):
        near_duplicate_groups(x, labels, max_group=0.001)


def test_groups_from_edges():
    assert groups_from_edges(6, [4, 1, 3], [5, 2, 2]).tolist() == [0, 1, 1, 1, 2, 2]
    assert groups_from_edges(3, [], []).tolist() == [0, 1, 2]


def _check_split(groups, parts, sizes):
    n = len(groups)
    allidx = torch.cat(list(parts.values()))
    assert len(allidx) == n and torch.equal(allidx.sort().values, torch.arange(n))  # disjoint and complete
    owner = torch.empty(n, dtype=torch.long)
    for s, idx in enumerate(parts.values()):
        owner[idx] = s
        assert torch.equal(idx, idx.sort().values)
    for gid in groups.unique():  # whole groups
        assert len(owner[groups == gid].unique()) == 1
    biggest = int(torch.bincount(groups).max())
    names = list(sizes)
    for name in names:
        want = sizes[name] or 0
        assert len(parts[name]) >= want
        if name != names[-1]:
            assert len(parts[name]) < want + biggest  # exceeded by less than one group


def test_group_split_whole_groups_sizes_and_seeds():
    groups = torch.arange(60).repeat_interleave(torch.arange(60) % 7 + 1)  # 60 groups of 1..7 images (240)
    groups = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(3))]
    sizes = {"calibration": 50, "selection": 40, "test": None}
    parts = group_split(groups, sizes, seed=0)
    assert list(parts) == ["calibration", "selection", "test"]
    _check_split(groups, parts, sizes)
    again = group_split(groups, sizes, seed=0)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    other = group_split(groups, sizes, seed=1)
    assert not torch.equal(parts["calibration"], other["calibration"])
    _check_split(groups, other, sizes)
    last_min = {"a": 30, "b": 100}
    _check_split(groups, group_split(groups, last_min, seed=2), last_min)
    single = group_split(groups, {"all": None})
    assert torch.equal(single["all"], torch.arange(len(groups)))


def test_group_split_stratified_keeps_class_shares():
    labels = torch.arange(4).repeat_interleave(100)  # 4 classes, 100 images each, groups of 5 within a class
    groups = torch.arange(80).repeat_interleave(5)
    sizes = {"calibration": 100, "test": None}
    for seed in range(3):
        parts = group_split(groups, sizes, seed=seed, strata=labels)
        _check_split(groups, parts, sizes)
        share = torch.bincount(labels[parts["calibration"]], minlength=4)
        assert int(share.min()) >= 20 and int(share.max()) <= 30  # 25 each, up to a group off
    with pytest.raises(ValueError, match="constant within each group"):
        group_split(torch.zeros(4, dtype=torch.long), {"a": 2, "b": None}, strata=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="strata"):
        group_split(groups, sizes, strata=labels[:-1])


def test_group_split_errors_on_impossible_sizes():
    groups = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)
    with pytest.raises(ValueError, match="more than the 18 images"):
        group_split(groups, {"a": 10, "b": 10})
    with pytest.raises(ValueError, match=">= 0"):
        group_split(groups, {"a": -1, "b": None})
    with pytest.raises(ValueError, match="empty"):
        group_split(groups, {})
    with pytest.raises(ValueError, match="cannot build splits"):  # 'a' takes 2 groups (12), 'b' gets 6 < 7
        group_split(groups, {"a": 7, "b": 7})

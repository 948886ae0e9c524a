"""Groups of images of the same physical object, and splits made of whole groups.

GTSRB's test set holds 30-frame tracks of each physical sign, shuffled and without a track id,
so a random (or contiguous) cut of the test set puts frames of the same sign on both sides of
it.  :func:`near_duplicate_groups` recovers groups of whole tracks: each image is reduced to a
small thumbnail, each image is linked to its nearest same-label images (and/or to all within a
distance threshold), and the groups are the connected components of the links.  A track's frames
are each other's nearest neighbours, so the components keep tracks whole; the price is that
similar tracks of one class fall into the same group (on GTSRB the largest group is a whole
class).  ``max_group`` caps the group size (closest links first), at the cost of cutting tracks.
:func:`group_split` then deals whole groups, in a seeded random order (optionally spread evenly
over each class), to calibration / selection / test splits, so that no group spans two splits.

The defaults were chosen on GTSRB's training set, whose file names give the true tracks
(``benchmarks/gtsrb_sign_groups.py``, ``benchmarks/results/gtsrb_sign_groups.md``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Defaults chosen on GTSRB's training tracks (benchmarks/results/gtsrb_sign_groups.md).
DEFAULT_SIZE = 4
DEFAULT_COLOUR = True
DEFAULT_NORMALISE = False
DEFAULT_THRESHOLD = math.inf
DEFAULT_NEIGHBOURS = 10
DEFAULT_MAX_GROUP = None


def thumbnails(images: torch.Tensor, size: int = DEFAULT_SIZE, colour: bool = DEFAULT_COLOUR,
               normalise: bool = DEFAULT_NORMALISE) -> torch.Tensor:
    """``[N, D]`` float32 descriptors: ``size`` x ``size`` area-averaged thumbnails.

    ``images``: ``[N, C, H, W]``, uint8 (scaled to [0, 1]) or float (taken as is).
    ``colour=False`` averages the channels to grey first.  ``normalise=True`` gives each
    thumbnail zero mean and unit norm over all its values (brightness and contrast removed;
    colour differences stay); a constant image then becomes the zero vector (distance 1 from
    every normalised image, 0 from other constant ones).
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if not colour:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.adaptive_avg_pool2d(x, size)
    x = x.flatten(1)
    if not normalise:
        return x.contiguous()
    hi, lo = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
    flat = (hi - lo) <= 1e-5 * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-12)  # rounding noise only
    x = x - x.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x.masked_fill(flat, 0.0)


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    r = parent[nodes]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def _union(parent: np.ndarray, i: np.ndarray, j: np.ndarray) -> None:
    """Vectorised union-find: merge the sets of ``i[k]`` and ``j[k]`` for every k (in place).

    Invariant ``parent[x] <= x``: a root is always hooked onto a smaller root, so no cycle forms.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    while i.size:
        ri, rj = _roots(parent, i), _roots(parent, j)
        keep = ri != rj
        if not keep.any():
            break
        ri, rj, i, j = ri[keep], rj[keep], i[keep], j[keep]
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        while True:  # full path compression
            gp = parent[parent]
            if np.array_equal(gp, parent):
                break
            parent[:] = gp


def _capped_union(parent: np.ndarray, i: np.ndarray, j: np.ndarray, cap: int) -> None:
    """Kruskal with a size cap: merge along the edges in the given order unless the group would exceed ``cap``."""
    size = np.ones(parent.size, dtype=np.int64)
    par = parent.tolist()
    sz = size.tolist()

    def find(a: int) -> int:
        while par[a] != a:
            par[a] = par[par[a]]
            a = par[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb and sz[ra] + sz[rb] <= cap:
            if sz[ra] < sz[rb]:
                ra, rb = rb, ra
            par[rb] = ra
            sz[ra] += sz[rb]
    parent[:] = [find(a) for a in range(parent.size)]


def _component_ids(parent: np.ndarray) -> torch.Tensor:
    """Contiguous group ids 0..G-1, numbered in order of each group's first image."""
    roots = _roots(parent, np.arange(parent.size))
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return torch.from_numpy(rank[inverse.reshape(-1)])


def groups_from_edges(n: int, i, j) -> torch.Tensor:
    """``LongTensor [n]``: connected components of the graph on ``n`` nodes with edges ``(i[k], j[k])``."""
    parent = np.arange(n, dtype=np.int64)
    _union(parent, np.asarray(i).reshape(-1), np.asarray(j).reshape(-1))
    return _component_ids(parent)


def _candidate_links(desc: torch.Tensor, labels: torch.Tensor, threshold: float, neighbours: int | None, chunk: int):
    """Yield ``(i, j, distance)`` numpy arrays of same-label links, one block of rows at a time."""
    lab = labels.cpu().numpy()
    t2 = float(threshold) ** 2
    sq = (desc * desc).sum(1)
    for v in np.unique(lab):
        idx = np.flatnonzero(lab == v)
        d, s = desc[idx], sq[idx]
        for start in range(0, len(idx), chunk):
            rows = torch.arange(start, min(start + chunk, len(idx)))
            d2 = (s[rows, None] + s[None, :] - 2.0 * d[rows] @ d.T).clamp_min_(0)
            d2[torch.arange(len(rows)), rows] = float("inf")  # no self-links
            if neighbours is not None:
                k = min(neighbours, len(idx) - 1)
                if k < 1:
                    continue
                w, c = d2.topk(k, dim=1, largest=False)
                keep = (w <= t2) & (w < math.inf)
                r, c, w = rows[:, None].expand_as(c)[keep], c[keep], w[keep]
            else:
                r, c = torch.nonzero((d2 <= t2) & (d2 < math.inf), as_tuple=True)
                w, r = d2[r, c], rows[r]
            if len(r):
                yield idx[r.numpy()], idx[c.numpy()], w.sqrt().numpy()


def near_duplicate_groups(images: torch.Tensor, labels: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, *,
                          max_group: float | None = DEFAULT_MAX_GROUP,
                          neighbours: int | None = DEFAULT_NEIGHBOURS, size: int = DEFAULT_SIZE,
                          colour: bool = DEFAULT_COLOUR, normalise: bool = DEFAULT_NORMALISE, chunk: int = 1024,
                          descriptors: torch.Tensor | None = None) -> torch.Tensor:
    """``LongTensor [N]`` group ids (0..G-1, in order of first appearance).

    Each image is linked to its ``neighbours`` nearest images of the same label (by Euclidean
    distance between :func:`thumbnails`; ``neighbours=None``: to all of them) that lie within
    ``threshold``, and a group is a connected component of the links.  Images of different
    labels are never linked.  ``neighbours=None`` with a finite ``threshold`` is plain single
    linkage.  ``max_group`` (images, or a fraction of N when a float < 1) caps the group size:
    links are then taken closest first and one that would make a group larger than the cap is
    skipped.  Distances are computed per label in blocks of ``chunk`` rows (memory ~ chunk x
    images of the label, plus the kept links when capped).  ``descriptors`` (``[N, D]``)
    replaces the thumbnails when given.

    Defaults (4 x 4 colour thumbnails in [0, 1], 10 neighbours, no threshold, no cap): on
    GTSRB's training tracks, at the test set's density, 99.5% of tracks end inside one group.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    desc = thumbnails(images, size, colour, normalise) if descriptors is None else torch.as_tensor(descriptors).float()
    n = desc.shape[0]
    if n != labels.shape[0]:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if neighbours is not None and neighbours < 1:
        raise ValueError(f"neighbours must be >= 1 or None, got {neighbours}")
    cap = None
    if max_group is not None:
        cap = math.floor(max_group * n) if isinstance(max_group, float) and max_group < 1 else int(max_group)
        if cap < 1:
            raise ValueError(f"max_group must allow groups of at least one image, got {max_group} for {n} images")
    parent = np.arange(n, dtype=np.int64)
    links = _candidate_links(desc, labels, threshold, neighbours, chunk)
    if cap is None:
        for i, j, _ in links:
            _union(parent, i, j)
    else:
        blocks = list(links)
        if blocks:
            i, j, w = (np.concatenate(b) for b in zip(*blocks))
            order = np.lexsort((np.maximum(i, j), np.minimum(i, j), w))  # closest first, ties by index
            _capped_union(parent, i[order], j[order], cap)
    return _component_ids(parent)


def _stratified_order(order: torch.Tensor, counts: torch.Tensor, group_strata: torch.Tensor,
                      gen: torch.Generator) -> torch.Tensor:
    """Reorder groups so that each stratum's groups are spread evenly over the sequence.

    Each stratum's groups (in the shuffled ``order``) get positions on [0, 1) spaced by their
    sizes, rotated by a random offset; sorting by position interleaves the strata, so every
    contiguous run of the sequence holds about its share of each stratum.
    """
    pos = torch.empty(len(order), dtype=torch.float64)
    shuffled_strata = group_strata[order]
    for s in torch.unique(group_strata):
        members = order[shuffled_strata == s]
        c = counts[members].double()
        centre = (c.cumsum(0) - c / 2) / c.sum()
        pos[members] = (centre + torch.rand((), generator=gen, dtype=torch.float64)) % 1.0
    return order[torch.sort(pos[order], stable=True).indices]


def group_split(groups: torch.Tensor, sizes: dict[str, int | None], seed: int = 0,
                strata: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Disjoint index sets of whole groups: ``{name: sorted LongTensor of indices}``, in the order of ``sizes``.

    The groups are shuffled with ``seed``; each split in turn takes the next groups until it
    holds at least its size (so it exceeds it by less than its last group); the last split
    takes every group left, and must still reach its own size (``None`` or 0: no minimum).
    Every index lands in exactly one split.  ``strata`` (``[N]``, e.g. the labels; constant
    within each group) spreads each stratum's groups evenly over the order, so that every
    split holds about its share of each stratum (as far as the group sizes allow).
    ``ValueError`` when the sizes cannot be met: negative sizes, sizes summing past the number
    of images, or groups too large for the last split to get its minimum with this seed.
    """
    groups = torch.as_tensor(groups).reshape(-1).long()
    if not sizes:
        raise ValueError("sizes is empty: name at least one split")
    names = list(sizes)
    need = {k: (0 if v is None else int(v)) for k, v in sizes.items()}
    bad = {k: v for k, v in need.items() if v < 0}
    if bad:
        raise ValueError(f"split sizes must be >= 0, got {bad}")
    n = groups.numel()
    if sum(need.values()) > n:
        raise ValueError(f"split sizes {need} add up to {sum(need.values())}, more than the {n} images")
    uniq, inverse = torch.unique(groups, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(uniq))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(uniq), generator=gen)
    if strata is not None:
        strata = torch.as_tensor(strata).reshape(-1)
        if strata.numel() != n:
            raise ValueError(f"strata has {strata.numel()} entries for {n} images")
        group_strata = torch.zeros(len(uniq), dtype=strata.dtype).scatter_(0, inverse, strata)
        if not torch.equal(group_strata[inverse], strata):
            raise ValueError("strata must be constant within each group")
        order = _stratified_order(order, counts, group_strata, gen)
    assign = torch.empty(len(uniq), dtype=torch.long)
    k, filled = 0, 0
    for g in order.tolist():
        while k < len(names) - 1 and filled >= need[names[k]]:
            k, filled = k + 1, 0
        assign[g] = k
        filled += int(counts[g])
    split_of = assign[inverse]
    out = {name: torch.nonzero(split_of == s, as_tuple=True)[0] for s, name in enumerate(names)}
    short = {name: (len(out[name]), need[name]) for name in names if len(out[name]) < need[name]}
    if short:
        largest = int(counts.max()) if len(counts) else 0
        raise ValueError(f"cannot build splits {need} from whole groups with seed {seed}: "
                         + ", ".join(f"{k!r} got {got} < {want}" for k, (got, want) in short.items())
                         + f" ({len(uniq)} groups, largest {largest} images; each split but the last overshoots "
                         "its size by up to one group: lower the sizes, use smaller groups or try another seed)")
    return out

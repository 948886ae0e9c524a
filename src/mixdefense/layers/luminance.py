"""Channel-tied ("luminance") noise statistics: SAEC's optional second test (issue 23).

SAEC's pseudo-saturation map (paper eq. 1) subtracts each pixel's mean over R, G, B, so a
perturbation that is equal in the three channels vanishes before the filter: channel-tied
uniform noise of 16/255 passes the shipped SAEC almost always.  This module measures noise in
the *luminance* ``g = mean_c x_c`` instead, where channel-tied noise keeps its full amplitude.

A plain noise estimate of ``g`` (e.g. the median absolute high-pass residual) confuses texture
with noise.  Three statistics, each robust to a different way clean images look "noisy",
make up the luminance test; an image is rejected when **any** of them exceeds its threshold
(a statistic that buys no detection on the calibration noise is left off):

* :func:`global_noise_level` — the PCA noise level of Liu, Tanaka & Okutomi (2013) / Chen et
  al. (2015) in its simplest form: ``sqrt`` of the smallest eigenvalue of the covariance of all
  ``5×5`` luminance patches.  Natural texture is correlated across a patch and spends little
  energy in its weakest direction; white noise adds ``σ²`` to every direction.  Best on
  images textured all over (CIFAR-10).
* :func:`flat_noise_level` — Donoho's wavelet MAD estimate restricted to flat regions: the
  diagonal Haar detail ``HH`` of the ``fraction`` of 2×2 blocks whose horizontal and vertical
  details (``LH² + HL²``) are smallest, ``σ̂ = median|HH| / 0.6745``, averaged over the four
  2×2 grid offsets.  For white noise the orthonormal Haar bands are uncorrelated, so choosing
  blocks by ``LH, HL`` does not bias ``HH`` (choosing them by ``HH``'s own pixels would).  Best
  on images with flat areas and textured backgrounds (GTSRB: a sign on foliage).
* :func:`clip_speckle` — clipped noise: where the clean image is saturated (every channel at
  0 or at 1), channel-tied noise is cut off on one side, so half the pixels stay exactly
  saturated and the noise estimates above see a flat region.  What it leaves is *speckle*:
  saturated pixels whose 4-neighbours are mostly not saturated.  Clean saturated regions are
  contiguous (speckle only at corners and specular dots).

All three are in ``[0, 1]``-pixel units or fractions (see each function), take images
``[B, C, H, W]`` in ``[0, 1]`` (``C = 1`` or ``3``; the luminance of a grey image is the
image), are batched and deterministic (stable sorts; every image is computed on its own
rows), and do not depend on the other images of the batch.  The two noise levels are
differentiable almost everywhere (medians and order statistics pass gradients to the selected
elements); the speckle count is piecewise constant.

:func:`allocate_thresholds` sets the thresholds of an OR of such tests jointly: it spends a
budget of clean rejections (:func:`clean_budget`, which also charges every active cut for the
fresh images it may reject) where it buys the most detection of noisy copies (never attacks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: names of the luminance test's statistics, in the order of :func:`luminance_statistics`' columns
STATISTICS = ("global", "flat", "speckle")
#: side of the square luminance patches of :func:`global_noise_level`
PATCH = 5
#: smallest image side the luminance statistics accept (a 5×5 patch must fit)
MIN_SIZE = PATCH
#: ``median |N(0, 1)|``: MAD → standard deviation
MAD_TO_STD = 0.6744897501960817
#: a channel value within this distance of 0 or 1 counts as saturated (half an 8-bit step)
CLIP_EPS = 0.5 / 255
#: Immerkær's (1996) noise-estimation kernel (a difference of two Laplacians); its squared taps sum to 36
IMMERKAER = ((1.0, -2.0, 1.0), (-2.0, 4.0, -2.0), (1.0, -2.0, 1.0))


def luminance(x: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean over channels, ``[B, C, H, W]`` → ``[B, H, W]`` (same range as ``x``).

    Channel-tied noise ``x + u·1`` keeps its full amplitude here (``g + u``) while independent
    per-channel noise shrinks by ``1/√C``.
    """
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    return x.mean(dim=1)


def _check_size(g: torch.Tensor, side: int, what: str) -> None:
    if g.shape[-1] < side or g.shape[-2] < side:
        raise ValueError(f"{what} needs images of at least {side}×{side} pixels, got {tuple(g.shape[-2:])}")


# -- the reference: a plain (texture-blind) estimate ---------------------------------------------
def mad_noise_level(x: torch.Tensor) -> torch.Tensor:
    """The naive luminance noise estimate ``[B]``: ``median |N * g| / (6 · 0.6745)`` over the image.

    ``N`` is :data:`IMMERKAER` (valid convolution); for white noise of standard deviation ``σ``
    the residual has standard deviation ``6σ``, so the result estimates ``σ`` in ``[0, 1]``
    pixel units — and, on texture, the texture's residual as well.  Kept as the reference the
    luminance test is compared with (``benchmarks/saec_luminance.py``).
    """
    g = luminance(x)
    _check_size(g, 3, "mad_noise_level")
    k = torch.tensor(IMMERKAER, dtype=g.dtype, device=g.device)[None, None]
    r = F.conv2d(g[:, None], k)[:, 0].flatten(1)
    return r.abs().median(dim=1).values / (6.0 * MAD_TO_STD)


# -- 1. PCA: the weakest direction of the patch covariance ----------------------------------------
def patch_covariance(g: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """Covariance ``[B, p², p²]`` (float64) of all ``p×p`` patches of each luminance map ``g [B, H, W]``.

    Computed in float64 as ``E[yyᵀ] − E[y]E[y]ᵀ`` over the ``(H−p+1)(W−p+1)`` patches of one image.
    """
    _check_size(g, patch, "patch_covariance")
    y = F.unfold(g[:, None].double(), patch)  # [B, p², L]
    mean = y.mean(dim=2, keepdim=True)
    return y @ y.transpose(1, 2) / y.shape[2] - mean @ mean.transpose(1, 2)


def global_noise_level(x: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """PCA noise level ``[B]`` (``[0, 1]`` pixel units): ``sqrt(λ_min)`` of the ``patch×patch`` patch covariance.

    For white noise of standard deviation ``σ`` every eigenvalue grows by ``σ²`` (the smallest
    sample eigenvalue underestimates ``σ²`` a little, the same for every image of a size).
    Returned in ``x``'s dtype.
    """
    g = luminance(x)
    lam = torch.linalg.eigvalsh(patch_covariance(g, patch))[:, 0]
    return lam.clamp_min(0).sqrt().to(x.dtype)


# -- 2. Haar HH on the flattest blocks -------------------------------------------------------------
def haar_details(g: torch.Tensor, dy: int = 0, dx: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal one-level Haar details of ``g [B, H, W]`` on the 2×2 grid offset by ``(dy, dx)``.

    Returns ``(HH, LH, HL)``, each ``[B, ⌊(H−dy)/2⌋, ⌊(W−dx)/2⌋]``: for a block ``[[a, b], [c, d]]``
    ``HH = (a − b − c + d)/2``, ``LH = (a + b − c − d)/2``, ``HL = (a − b + c − d)/2``.  White
    noise of standard deviation ``σ`` gives each band standard deviation ``σ``, uncorrelated.
    """
    g = g[:, dy:, dx:]
    h, w = g.shape[1] // 2 * 2, g.shape[2] // 2 * 2
    g = g[:, :h, :w]
    a, b, c, d = g[:, 0::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 0::2], g[:, 1::2, 1::2]
    return (a - b - c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2


def flat_noise_level(x: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Noise level of the flattest blocks ``[B]`` (``[0, 1]`` pixel units).

    On each of the four 2×2 grid offsets: rank the blocks by ``LH² + HL²`` (stable sort, so
    ties go to the earlier block in raster order), keep the ``round(fraction · n)`` flattest
    (at least one) and take ``median |HH| / 0.6745`` over them; the four estimates are averaged.
    ``fraction = 1`` is Donoho's wavelet MAD over the whole image.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = luminance(x)
    _check_size(g, 3, "flat_noise_level")
    levels = []
    for dy in (0, 1):
        for dx in (0, 1):
            hh, lh, hl = haar_details(g, dy, dx)
            texture, detail = (lh.square() + hl.square()).flatten(1), hh.flatten(1)
            keep = max(1, round(fraction * texture.shape[1]))
            order = torch.sort(texture, dim=1, stable=True).indices[:, :keep]
            levels.append(detail.gather(1, order).abs().median(dim=1).values / MAD_TO_STD)
    return torch.stack(levels).mean(dim=0)


# -- 3. speckle of clipped noise --------------------------------------------------------------------
def saturated(x: torch.Tensor, eps: float = CLIP_EPS) -> torch.Tensor:
    """Fully saturated pixels, ``bool [B, 2, H, W]``: every channel ``≤ eps`` (plane 0) or ``≥ 1 − eps`` (plane 1)."""
    return torch.stack([(x <= eps).all(dim=1), (x >= 1 - eps).all(dim=1)], dim=1)


def clip_speckle(x: torch.Tensor, eps: float = CLIP_EPS) -> torch.Tensor:
    """Fraction ``[B]`` in ``[0, 1]`` of the pixels that are isolated saturated pixels.

    A pixel counts when it is fully saturated at one end (:func:`saturated`) and at least 3 of
    its 4 neighbours are not saturated at that end (borders replicate, so an edge pixel has its
    own value outside).  Divided by ``H·W``, so it does not depend on the image size.
    """
    m = saturated(x, eps).to(x.dtype)
    p = F.pad(m, (1, 1, 1, 1), mode="replicate")
    neighbours = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    isolated = m * (neighbours <= 1).to(x.dtype)
    return isolated.sum(dim=(1, 2, 3)) / (x.shape[-1] * x.shape[-2])


def luminance_statistics(x: torch.Tensor, flat_fraction: float = 0.1) -> torch.Tensor:
    """The luminance test's statistics ``[B, 3]``, columns :data:`STATISTICS` (larger = noisier).

    ``x``: images ``[B, C, H, W]`` in ``[0, 1]`` with ``H, W ≥`` :data:`MIN_SIZE`.
    """
    return torch.stack([global_noise_level(x), flat_noise_level(x, flat_fraction), clip_speckle(x)], dim=1)


# -- joint thresholds of an OR of tests -------------------------------------------------------------
#: ``k`` of a test that is off (its cut is ``+inf``: it rejects nothing)
OFF = -1


def clean_budget(max_clean_rejection: float, num_clean: int) -> int:
    """The clean budget of an OR of cuts calibrated on ``num_clean`` images: ``⌊bound · (n + 1)⌋``.

    A cut that passes all but ``k`` of ``n`` exchangeable clean scores rejects a fresh clean image
    with probability up to ``(k + 1)/(n + 1)``: even a cut at the largest clean score (``k = 0``)
    costs ``1/(n + 1)``.  For an OR of ``m`` active cuts that rejects ``u`` calibration images, a
    fresh image's rejection is at most about ``(u + m)/(n + 1)``; :func:`allocate_thresholds`
    keeps ``u + m`` within this budget.  It matters for small calibration sets (2,000 images at
    0.5 %: 10 units, 4 of them taken by four active cuts) and hardly for large ones (10,000 at 1 %).
    """
    if not 0.0 <= max_clean_rejection < 1.0:
        raise ValueError(f"max_clean_rejection must be in [0, 1), got {max_clean_rejection}")
    if num_clean < 1:
        raise ValueError(f"num_clean must be >= 1, got {num_clean}")
    return int(max_clean_rejection * (num_clean + 1) + 1e-9)


def _threshold(desc: torch.Tensor, k: int) -> float:
    """The cut that rejects the ``k`` largest of ``desc`` (sorted descending): midway between the ``k``-th
    and the ``(k+1)``-th; for ``k = 0`` the largest itself (no clean score is above it); ``+inf`` when off."""
    if k == OFF:
        return math.inf
    if k == 0:
        return float(desc[0])
    if k >= len(desc):
        return float(desc[-1]) - 1.0 - abs(float(desc[-1]))
    return float(desc[k - 1] + desc[k]) / 2


def allocate_thresholds(clean: torch.Tensor, noisy: torch.Tensor, budget: int, required: tuple[int, ...] = (),
                        steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> tuple[torch.Tensor, list[int]]:
    """Thresholds ``t [T]`` of the rule "reject when ``s_i > t_i`` for some test ``i``".

    Args:
        clean: scores ``[T, N]`` of ``N`` clean images under ``T`` tests (larger = more suspicious).
        noisy: scores ``[T, M]`` of ``M`` noisy copies (the calibration noise, never attacks).
        budget: the clean budget (:func:`clean_budget`): the clean calibration images the OR
            rejects plus the number of active cuts stay ``≤ budget``.
        required: tests that are always on (the others may stay off: ``t = +inf``).

    Greedy and deterministic: the required tests start at their largest clean score (rejecting
    no calibration image, but any input that scores above every clean one), the others off.
    Each round either switches a test on (at ``k = s − 1`` rejections, ``s ∈ steps``) or moves an
    active cut down by ``s`` clean images (a cut sits midway between two consecutive clean
    scores), and keeps the move with the largest gain in noisy detection per unit of budget
    spent, while the budget holds; it stops when no move gains.  Ties go to the earlier test,
    then the smaller step.

    Returns:
        ``(t, k)``: the thresholds (float64) and, per test, how many calibration images its cut
        rejects on its own (:data:`OFF`, ``-1``, for a test left off).
    """
    if clean.dim() != 2 or noisy.dim() != 2 or clean.shape[0] != noisy.shape[0]:
        raise ValueError(f"clean and noisy must be [T, N] and [T, M], got {tuple(clean.shape)} and {tuple(noisy.shape)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tests, n = clean.shape
    if any(not 0 <= i < tests for i in required):
        raise ValueError(f"required tests must be indices in [0, {tests}), got {required}")
    clean, noisy = clean.double(), noisy.double()
    desc = clean.sort(dim=1, descending=True).values

    def evaluate(ks: list[int]) -> tuple[int, float, torch.Tensor]:
        t = torch.tensor([_threshold(desc[i], ks[i]) for i in range(tests)], dtype=torch.float64)[:, None]
        cost = int((clean > t).any(0).sum()) + sum(k != OFF for k in ks)
        return cost, float((noisy > t).any(0).double().mean()), t[:, 0]

    ks = [0 if i in required else OFF for i in range(tests)]
    spent, caught, thresholds = evaluate(ks)
    while True:
        best = None
        for i in range(tests):
            for s in steps:
                k = s - 1 if ks[i] == OFF else ks[i] + s
                if k > n:
                    break
                trial = ks[:i] + [k] + ks[i + 1:]
                cost, d, t = evaluate(trial)
                if cost > budget:
                    break
                gain = (d - caught) / max(1, cost - spent)
                if gain > 0 and (best is None or gain > best[0] + 1e-15):
                    best = (gain, trial, cost, d, t)
        if best is None:
            return thresholds, ks
        _, ks, spent, caught, thresholds = best

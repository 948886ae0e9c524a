"""Feature Squeezing (Xu, Evans, Qi, NDSS 2018), a baseline detector with MixDefense's layer interface.

The classifier's softmax on ``x`` is compared with its softmax on *squeezed* copies of ``x``;
an AE's prediction usually moves much more under squeezing than a clean image's:

``score(x) = max_k ‖softmax(f(x)) − softmax(f(squeeze_k(x)))‖₁``  (in ``[0, 2]``)

and ``x`` is rejected when the score exceeds a threshold set on clean validation images at a
target false-rejection rate (default 5 %).

Squeezers (names as in :data:`SQUEEZERS`; images ``[B, C, H, W]`` in ``[0, 1]``):

* ``bits:<n>`` — bit-depth reduction to ``n`` bits: ``round(x·(2ⁿ − 1)) / (2ⁿ − 1)``
  (the paper: 1 bit for MNIST, 5 bits for CIFAR-10);
* ``median:<k>`` — ``k×k`` median smoothing per channel (the paper: 2×2 for MNIST and CIFAR-10).
  For even ``k`` the window spans offsets ``−k/2 … k/2 − 1`` and the upper median is
  taken, borders are mirrored half-sample (all as SciPy's ``median_filter``, mode ``reflect``,
  which Xu et al. used);
* ``nlm:<search>-<patch>-<h>`` — non-local means (:func:`non_local_means`) with a
  ``search×search`` search window, ``patch×patch`` patches and filter strength ``h`` on the 0–255
  scale (the paper: ``nlm:13-3-2`` for CIFAR-10, as OpenCV's
  ``fastNlMeansDenoisingColored(img, None, h=2, hColor=2, templateWindowSize=3, searchWindowSize=13)``).
  Plain PyTorch (no OpenCV), OpenCV's pipeline in floating point: colour images are converted
  to CIELAB scaled as OpenCV's 8-bit Lab, L is denoised with strength ``h`` and the (a, b) pair
  jointly with ``hColor = h``, with OpenCV's weights, and converted back; 1-channel images are
  denoised directly.  On CIFAR-10 it changes pixels by 1.31 on average on the 0–255 scale,
  OpenCV's call by 1.52–1.59, the two differing by 0.75, mostly OpenCV's 8-bit Lab rounding;
  see :func:`non_local_means` for the formula and the measured differences.

The paper's detectors: MNIST ``bits:1`` + ``median:2``; CIFAR-10 ``bits:5`` + ``median:2`` +
``nlm:13-3-2`` (the per-dataset choice is :data:`mixdefense.commands.baselines.SQUEEZERS`).

The detector is a *post-classifier* layer (``kind = "post"``; it ignores the label it is
given) that needs the classifier's softmax: :class:`~mixdefense.pipeline.MixDefense` binds
its classifier to it (:meth:`FeatureSqueezing.bind`).  The classifier is *not* a submodule
(it is the pipeline's), so the layer's ``state_dict`` holds only the threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mixdefense.classifiers import UsesClassifier
from mixdefense.layers.base import DetectorLayer, register_layer
from mixdefense.validation import check_images

SQUEEZERS = ("bits", "median", "nlm")


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` in ``[0, 1]`` quantised to ``bits`` bits (``2**bits`` levels), same shape."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in [1, 16], got {bits}")
    levels = 2**bits - 1
    return torch.round(x * levels) / levels


def _symmetric_pad(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    """Half-sample symmetric padding along ``dim`` (``d c b a | a b c d | d c b a``; SciPy's ``reflect``)."""
    parts = [x.narrow(dim, 0, before).flip(dim)] if before else []
    parts.append(x)
    if after:
        parts.append(x.narrow(dim, x.shape[dim] - after, after).flip(dim))
    return torch.cat(parts, dim)


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """``k×k`` median smoothing per channel of ``x [B, C, H, W]`` (SciPy's ``median_filter(size=k)``)."""
    if k < 2:
        raise ValueError(f"median window must be >= 2, got {k}")
    b, c, h, w = x.shape
    before, after = k // 2, k - 1 - k // 2  # window offsets -k//2 … k-1-k//2 (SciPy's origin 0)
    if max(before, after) > min(h, w):
        raise ValueError(f"median window {k} is larger than the {h}x{w} image")
    padded = _symmetric_pad(_symmetric_pad(x, before, after, 2), before, after, 3)
    patches = F.unfold(padded, k).view(b, c, k * k, h * w)
    return patches.sort(dim=2).values[:, :, (k * k) // 2].view(b, c, h, w)


#: OpenCV's fastNlMeans sets a weight below this (relative to the centre's 1) to 0; so do we.
NLM_WEIGHT_CUTOFF = 1e-3


def _check_nlm(search: int, patch: int, h: float) -> None:
    if search < 1 or search % 2 == 0:
        raise ValueError(f"non-local means search window must be an odd number >= 1, got {search}")
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"non-local means patch must be an odd number >= 1, got {patch}")
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"non-local means filter strength h must be a finite number > 0, got {h}")


#: OpenCV's RGB → XYZ matrix (sRGB primaries) and D65 white point (``imgproc/src/color_lab.cpp``).
_RGB2XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_D65 = (0.950456, 1.0, 1.088754)
_LAB_EPS, _LAB_KAPPA = 0.008856, 903.3  # OpenCV's CIE ε and κ (L = κ·Y below ε)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    # the cube root's argument is clamped so that its (unused) gradient stays finite below ε
    return torch.where(t > _LAB_EPS, t.clamp_min(_LAB_EPS) ** (1 / 3), 7.787 * t + 16 / 116)


def _lab_f_inv(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u > 7.787 * _LAB_EPS + 16 / 116, u**3, (u - 16 / 116) / 7.787)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """CIELAB of linear RGB images ``x [B, 3, H, W]`` in ``[0, 1]``, scaled as OpenCV's 8-bit Lab, divided by 255.

    OpenCV's ``cvtColor(img, COLOR_LBGR2Lab)`` (what ``fastNlMeansDenoisingColored`` calls: no sRGB
    gamma) in floating point, without its 8-bit rounding: ``XYZ = M·RGB / white`` (OpenCV's matrix,
    D65), ``L = 116·f(Y) − 16`` (``903.3·Y`` below 0.008856), ``a = 500·(f(X) − f(Y))``, ``b = 200·(f(Y) − f(Z))`` with
    ``f(t) = t^(1/3)`` above 0.008856 and ``7.787·t + 16/116`` below, returned as
    ``(L·255/100, a + 128, b + 128) / 255``, channel 0 = L (in ``[0, 1]``; a, b within
    ``[0.08, 0.89]`` for RGB in ``[0, 1]``).  Inverse: :func:`lab_to_rgb`.
    """
    m = torch.tensor(_RGB2XYZ, dtype=torch.float64) / torch.tensor(_D65, dtype=torch.float64)[:, None]
    xyz = torch.einsum("ij,bjhw->bihw", m.to(x), x)
    fx, fy, fz = _lab_f(xyz).unbind(1)
    big_l = torch.where(xyz[:, 1] > _LAB_EPS, 116 * fy - 16, _LAB_KAPPA * xyz[:, 1])
    return torch.stack([big_l / 100, (500 * (fx - fy) + 128) / 255, (200 * (fy - fz) + 128) / 255], 1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Linear RGB ``[B, 3, H, W]`` of :func:`rgb_to_lab`'s scaled CIELAB (OpenCV's ``COLOR_Lab2LBGR``, in
    floating point, not clamped; the exact inverse of :func:`rgb_to_lab`)."""
    big_l, a, b = lab[:, 0] * 100, lab[:, 1] * 255 - 128, lab[:, 2] * 255 - 128
    low = big_l <= _LAB_KAPPA * _LAB_EPS
    y = torch.where(low, big_l / _LAB_KAPPA, ((big_l + 16) / 116) ** 3)
    fy = torch.where(low, 7.787 * y + 16 / 116, (big_l + 16) / 116)
    m_inv = torch.linalg.inv(torch.tensor(_RGB2XYZ, dtype=torch.float64)) * torch.tensor(_D65, dtype=torch.float64)
    xyz = torch.stack([_lab_f_inv(fy + a / 500), y, _lab_f_inv(fy - b / 200)], 1)
    return torch.einsum("ij,bjhw->bihw", m_inv.to(lab), xyz)


def non_local_means(x: torch.Tensor, search: int = 13, patch: int = 3, h: float = 2.0,
                    h_color: float | None = None) -> torch.Tensor:
    """Non-local means denoising of ``x [B, C, H, W]`` in ``[0, 1]``, same shape (batched, differentiable).

    Colour images (``C = 3``, RGB) follow OpenCV's ``fastNlMeansDenoisingColored(img, None, h,
    hColor, patch, search)``: they are converted to CIELAB scaled as OpenCV's 8-bit Lab
    (:func:`rgb_to_lab`: ``L·255/100, a + 128, b + 128``, linear RGB as OpenCV's ``LBGR2Lab``),
    the L channel is denoised with strength ``h`` and the (a, b) pair *jointly* (one weight from
    both, as OpenCV denoises its 2-channel ``ab`` image) with strength ``h_color`` (default ``h``),
    then converted back (:func:`lab_to_rgb`) and clamped to ``[0, 1]``.  Other images (``C = 1``:
    MNIST-like; any other ``C``) are denoised directly, all channels sharing one weight (OpenCV's
    ``fastNlMeansDenoising``).

    The denoiser, for each channel group ``G`` (L; a, b; or all channels of a non-colour image)
    with its strength ``h_G``: every output pixel ``i`` is a weighted mean of the pixels ``j`` of
    the ``search×search`` window centred on it (the centre included)::

        out(i) = Σ_j w(i, j) · v(j) / Σ_j w(i, j)
        w(i, j) = exp(−d²(i, j) / h_G²), set to 0 where it is below 1e-3 (:data:`NLM_WEIGHT_CUTOFF`)
        d²(i, j) = mean over the patch×patch offsets o and G's channels of (255·v(i+o) − 255·v(j+o))²

    (``v`` the channels being denoised, on the 8-bit scale divided by 255), so distances and
    ``h`` are on the 0–255 scale and ``w(i, i) = 1``.  Borders are mirrored without repeating the
    edge (``dcb|abcd|cba``: PyTorch's ``reflect``, OpenCV's ``BORDER_DEFAULT``), by
    ``search//2 + patch//2`` pixels.  One vectorised pass over the batch per search offset
    (``search²`` of them) and group: squared differences with the shifted image, summed over the
    group's channels, then a separable ``patch×patch`` box sum.  About 0.32 s for 256
    CIFAR-10 images (``13-3-2``) on one CPU thread.

    This is OpenCV's weight (``exp(−SSD / (patch²·C·h²))``, ``C`` the channels denoised together,
    with the same 1e-3 cut-off and border; no ``2σ²`` offset) and OpenCV's colour pipeline, with
    these remaining differences:

    * OpenCV works on 8-bit integers: its 8-bit ``LBGR → Lab`` and ``Lab → LBGR`` conversions are
      fixed-point and rounded (the round trip alone moves CIFAR-10 pixels by 0.66–0.67 on the 0–255
      scale; its ``Lab → LBGR`` differs from the exact inverse of the same 8-bit Lab by 0.52), the
      patch SSD is floored to a multiple of ``2^⌈log₂ patch²⌉`` (16 for 3×3 patches) before its
      weight lookup table, and the weights are fixed-point integers.  Here everything is floating
      point on the unquantised input (an AE need not lie on the 8-bit grid), which keeps the
      squeezer differentiable; rounding the Lab image to integers before and after denoising (and
      the output to 8 bits) would only take the difference below from 0.75 to 0.67.
    * The channel order: Xu et al.'s code hands OpenCV the RGB array as it is, which OpenCV reads
      as BGR, so its "Lab" is computed with R and B swapped (which changes the result by 1.05
      against OpenCV in the right order).  Here channel 0 is R, as in this package's images;
      ``non_local_means(x.flip(1)).flip(1)`` reproduces the swap.

    Measured on 100 CIFAR-10 test images with ``13-3-2`` (0–255 units, mean absolute
    difference), OpenCV 4.14 (``opencv-python-headless``): this function changes the images by
    1.31, OpenCV's ``fastNlMeansDenoisingColored`` in BGR order by 1.52 (the paper's call, RGB read
    as BGR: 1.59); this function vs OpenCV in BGR order 0.75 (max 6.1), vs the paper's call 0.96
    (with the swap above: 0.76).  Run on OpenCV's own 8-bit Lab channels, the kernel reproduces
    ``fastNlMeansDenoisingColored`` to 0.057 (per channel against the grayscale
    ``fastNlMeansDenoising``: 0.07), so the difference is OpenCV's 8-bit Lab conversions.
    The earlier version, which denoised RGB jointly, changed the images by 0.13 only.

    Args:
        x: images ``[B, C, H, W]`` in ``[0, 1]`` (RGB when ``C = 3``), larger than
            ``search//2 + patch//2`` on each side.
        search: side of the (odd) search window (OpenCV's ``searchWindowSize``).
        patch: side of the (odd) patches compared (OpenCV's ``templateWindowSize``).
        h: filter strength on the 0–255 scale (> 0; OpenCV's ``h``): of L for colour images,
            of all channels otherwise.
        h_color: strength for the a, b channels of colour images (OpenCV's ``hColor``; default ``h``).
    """
    _check_nlm(search, patch, h)
    h_color = h if h_color is None else h_color
    if not (math.isfinite(h_color) and h_color > 0):
        raise ValueError(f"non-local means colour strength h_color must be a finite number > 0, got {h_color}")
    if x.dim() != 4:
        raise ValueError(f"non-local means expects images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        return _nlm_kernel(x, search, patch, h)
    lab = rgb_to_lab(x)
    lab = torch.cat([_nlm_kernel(lab[:, :1], search, patch, h), _nlm_kernel(lab[:, 1:], search, patch, h_color)], 1)
    return lab_to_rgb(lab).clamp(0.0, 1.0)


def _nlm_kernel(x: torch.Tensor, search: int, patch: int, h: float) -> torch.Tensor:
    """The NLM kernel of :func:`non_local_means` on ``x [B, C, H, W]`` (0–255 scale / 255), all ``C`` channels
    sharing one weight (OpenCV's ``fastNlMeansDenoising`` on a ``C``-channel image)."""
    b, c, height, width = x.shape
    s2, p2 = search // 2, patch // 2
    pad = s2 + p2
    if pad >= min(height, width):
        raise ValueError(f"non-local means {search}-{patch} needs images larger than {pad}x{pad} pixels, got {height}x{width}")
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    hh, ww = height + 2 * p2, width + 2 * p2  # the image with a patch-radius border: where patches are centred
    ref = padded[:, :, s2:s2 + hh, s2:s2 + ww]
    scale = -(255.0**2) / (h * h * c * patch * patch)  # patch SSD summed over channels → mean d², 0–255 scale, / h²
    # weights below the cut-off are 0: clamp the exponent there first (exp of huge negatives hits slow denormals)
    floor = math.log(NLM_WEIGHT_CUTOFF) - 1.0
    num = torch.zeros_like(x)
    den = x.new_zeros(b, 1, height, width)
    for dy in range(search):
        for dx in range(search):
            shifted = padded[:, :, dy:dy + hh, dx:dx + ww]
            ssd = _box_sum(torch.sub(ref, shifted).square_().sum(1, keepdim=True), patch)
            w = F.threshold(ssd.mul_(scale).clamp_min_(floor).exp_(), NLM_WEIGHT_CUTOFF, 0.0)
            num.addcmul_(w, shifted[:, :, p2:p2 + height, p2:p2 + width])
            den.add_(w)
    return num.div_(den).clamp_(0.0, 1.0)  # den >= 1 (the centre's weight)


def _box_sum(t: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of ``t`` over its ``k×k`` windows (last two dims, no padding): separable, much faster than ``avg_pool2d`` on CPU."""
    rows, cols = t.shape[-2] - k + 1, t.shape[-1] - k + 1
    r = t[..., :rows, :]
    for i in range(1, k):
        r = r + t[..., i:i + rows, :]
    out = r[..., :cols]
    for i in range(1, k):
        out = out + r[..., i:i + cols]
    return out


_NLM_ARG = re.compile(r"(\d+)-(\d+)-(\d+(?:\.\d+)?)")


def parse_squeezer(spec: str) -> tuple[str, int] | tuple[str, tuple[int, int, float]]:
    """``"bits:1"`` → ``("bits", 1)``, ``"median:2"`` → ``("median", 2)``,
    ``"nlm:13-3-2"`` → ``("nlm", (13, 3, 2.0))`` (search window, patch, h); clear error on anything else."""
    name, _, arg = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    expected = "expected one of 'bits:<n>', 'median:<k>' or 'nlm:<search>-<patch>-<h>' (e.g. 'bits:1', 'median:2', 'nlm:13-3-2')"
    if name in ("bits", "median") and arg.isdigit():
        return name, int(arg)
    if name == "nlm":
        m = _NLM_ARG.fullmatch(arg)
        if not m:
            raise ValueError(f"squeezer {spec!r}: non-local means takes '<search>-<patch>-<h>' with odd integer "
                             f"search and patch windows and h > 0 (e.g. 'nlm:13-3-2'); {expected}")
        search, patch, h = int(m[1]), int(m[2]), float(m[3])
        try:
            _check_nlm(search, patch, h)
        except ValueError as e:
            raise ValueError(f"squeezer {spec!r}: {e}") from None
        return name, (search, patch, h)
    raise ValueError(f"squeezer {spec!r}: {expected}")


def squeeze(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply the squeezer named by ``spec`` (see :func:`parse_squeezer`) to ``x``."""
    name, arg = parse_squeezer(spec)
    if name == "bits":
        return bit_depth(x, arg)
    if name == "median":
        return median_filter(x, arg)
    return non_local_means(x, *arg)


@dataclass
class SqueezeCalibration:
    """How the threshold was set: on ``num_images`` clean images at ``target_frr``."""

    threshold: float
    target_frr: float
    achieved_frr: float
    num_images: int

    def as_dict(self) -> dict:
        return asdict(self)


@register_layer
class FeatureSqueezing(UsesClassifier, DetectorLayer):
    """The Feature Squeezing detector (see the module docstring).

    Args:
        squeezers: squeezer specs, e.g. ``("bits:1", "median:2")`` (MNIST) or
            ``("bits:5", "median:2", "nlm:13-3-2")`` (colour images).
        classifier: the model whose softmax is compared (or bind it later with :meth:`bind`).
    """

    type_name = "feature_squeezing"
    file_format = "mixdefense.feature_squeezing/1"
    kind = "post"

    def __init__(self, squeezers: Sequence[str] = ("bits:1", "median:2"), classifier: nn.Module | None = None):
        super().__init__()
        if not squeezers:
            raise ValueError("Feature Squeezing needs at least one squeezer")
        for s in squeezers:
            parse_squeezer(s)
        self.squeezers = list(squeezers)
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.calibration: SqueezeCalibration | None = None
        self._classifier: list[nn.Module] = []  # see UsesClassifier
        if classifier is not None:
            self.bind(classifier)

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.threshold))

    def _score(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The score of ``x`` given the classifier's ``logits`` on it (one forward per squeezer)."""
        p = F.softmax(logits, dim=1)
        return torch.stack([(p - F.softmax(self._logits(squeeze(x, s)), 1)).abs().sum(1) for s in self.squeezers], 1).amax(1)

    def score(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` max L1 distance between the softmax of ``x`` and of each squeezed ``x`` (``y`` unused)."""
        check_images(x)
        return self._score(x, self._logits(x))

    def _check_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError("FeatureSqueezing is not calibrated: call calibrate() or load a calibrated file")

    def margin(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``score / threshold`` ``[B]``: ``> 1`` exactly where the input is rejected."""
        self._check_calibrated()
        return self.score(x) / self.threshold.clamp_min(1e-12)

    def labels_and_margins(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the classifier's labels [B], margins [B])``, sharing the classifier's forward on ``x``."""
        self._check_calibrated()
        check_images(x)
        logits = self._logits(x)
        return logits.argmax(1), self._score(x, logits) / self.threshold.clamp_min(1e-12)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, target_frr: float = 0.05, batch_size: int = 500) -> SqueezeCalibration:
        """Threshold = the ``1 − target_frr`` quantile of the clean scores of ``x`` (clean rejection ≤ target)."""
        if not 0.0 <= target_frr < 1.0:
            raise ValueError(f"target_frr must be in [0, 1), got {target_frr}")
        scores = torch.cat([self.score(xb).cpu() for xb in x.split(batch_size)]).double()
        t = torch.quantile(scores, 1.0 - target_frr, interpolation="higher")
        self.threshold.fill_(float(t))
        self.calibration = SqueezeCalibration(float(t), target_frr, float((scores > t).double().mean()), len(scores))
        return self.calibration

    def payload(self) -> dict:
        """Settings and threshold as plain values (what its file and detector bundles store)."""
        return {"squeezers": list(self.squeezers), "threshold": self.threshold.cpu(),
                "calibration": self.calibration.as_dict() if self.calibration else None}

    @classmethod
    def from_payload(cls, payload: dict) -> FeatureSqueezing:
        """Rebuild a calibrated (unbound) layer from :meth:`payload`'s dict."""
        layer = cls(payload["squeezers"])
        layer.threshold.copy_(payload["threshold"])
        if payload.get("calibration"):
            layer.calibration = SqueezeCalibration(**payload["calibration"])
        return layer.eval()

    def extra_repr(self) -> str:
        return f"squeezers={self.squeezers}, threshold={float(self.threshold):.4g}"

"""SAEC — the simple adversarial example catcher, MixDefense's LP-defense layer (paper §3).

No training.  For a batch of images ``x`` in ``[0, 1]``:

1. **Pseudo-saturation map** (eq. 1): ``x_sat = (Σ_c |x_c − x_mean|^p)^(1/p)`` with ``x_mean``
   the per-pixel mean over the channels, ``p = 8`` by default.  It suppresses the image's
   content (brightness, smooth colour) and keeps per-pixel channel disagreement, which
   is where additive perturbations show.
2. **Noise-contrast feature**: a linear high-pass (steganalysis) kernel applied to
   ``x_sat`` without padding (``valid`` convolution, so borders add no artificial edges).
3. **Histogram** ``H`` of the filtered map over the fixed range ``[-value_range,
   value_range]`` with ``L = bins`` equal bins; ``H[i]`` is the *fraction* of the map's
   pixels in bin ``i``, so the score does not depend on the image size.  Values outside
   the range fall in no bin (as with :func:`torch.histc`).
4. **Noise-level score** (eq. 2): ``NL = (1/L) Σ_i (H[i] − μ)²``, the variance of the
   bin counts.

Which side of the threshold is "perturbed" (derived, and tested in ``tests/test_saec.py``):
a clean image's residuals concentrate around 0, so a few bins hold almost all the mass and
the bin counts have a *large* variance.  Added noise spreads the residuals over many bins
(a flatter histogram, smaller variance) and, when strong, pushes them out of the range
altogether (every bin shrinks, smaller variance still).  Hence **NL decreases with the
perturbation, and SAEC rejects an input when ``NL < threshold``**.  Because out-of-range
values are dropped rather than clamped into the edge bins, the score keeps falling as the
perturbation grows: a large ε cannot pile mass into edge bins and look "concentrated"
again (the saturation that makes a clamped histogram sag at large ε).

Grayscale inputs (one channel): ``x_c − x_mean`` is identically 0.  For ``C = 1`` SAEC
replaces the channel mean by a *local spatial mean* (3×3 box filter, replicate padding):
``x_sat = |x − box3(x)|`` (the p-norm of a single term is its absolute value).  This keeps
eq. 1's idea — deviation from a local reference that suppresses smooth content — along
the only axis a grayscale image has.  ``gray_mode="identity"`` (``x_sat = x``, i.e. plain
steganalysis on intensities) is the alternative; ``benchmarks/saec_ablation.py`` compares
them on clean versus uniform-noise MNIST only (never on attacks).

**Optional luminance test** (``luminance=True``; off by default, and then SAEC is exactly the
paper's layer: same buffers, same scores, same files).  Eq. 1 subtracts the channel mean, so a
perturbation equal in R, G and B ("channel-tied") is invisible to it.  The option adds the
luminance statistics of :mod:`mixdefense.layers.luminance` (a PCA noise level, a flat-region
Haar noise level and the speckle of clipped noise, all on the channel mean): the input is
rejected when ``NL < threshold`` **or** any luminance statistic exceeds its own threshold.
:meth:`SAEC.calibrate` then sets the four thresholds jointly
(:func:`~mixdefense.layers.luminance.allocate_thresholds`): the clean budget
``max_clean_rejection`` bounds the OR (for fresh images:
:func:`~mixdefense.layers.luminance.clean_budget`), and it is spent where it buys the most
detection of uniform-noise copies, half independent per channel (the paper's) and half
channel-tied.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixdefense.layers import luminance as lum
from mixdefense.layers.base import DetectorLayer, register_layer
from mixdefense.metrics import detection_auroc
from mixdefense.validation import check_images

#: Steganalysis high-pass kernels (spatial rich model; Fridrich & Kodovský 2012).
KERNELS: dict[str, list[list[float]]] = {
    # 5×5 "KV" kernel, divided by 12.
    "kv": [[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]],
    # 3×3 "KB" kernel, divided by 4.
    "kb": [[-1, 2, -1], [2, -4, 2], [-1, 2, -1]],
    # 3×3 second-order horizontal residual [1, -2, 1], divided by 2.
    "second_order": [[0, 0, 0], [1, -2, 1], [0, 0, 0]],
}
KERNEL_SCALE = {"kv": 12.0, "kb": 4.0, "second_order": 2.0}
GRAY_MODES = ("local_mean", "identity")


def kernel_tensor(name: str) -> torch.Tensor:
    """The named high-pass kernel as a ``[1, 1, k, k]`` float tensor (zero-sum)."""
    if name not in KERNELS:
        raise ValueError(f"unknown SAEC kernel {name!r}; choose one of {sorted(KERNELS)}")
    return (torch.tensor(KERNELS[name], dtype=torch.float32) / KERNEL_SCALE[name])[None, None]


def pseudo_saturation(x: torch.Tensor, p: float = 8.0, gray_mode: str = "local_mean") -> torch.Tensor:
    """Eq. 1: ``(Σ_c |x_c − x_mean|^p)^(1/p)`` → ``[B, H, W]`` (see the module docstring for C = 1).

    The deviations are scaled by a constant ``s`` before the power and the result divided
    by ``s`` (exact in exact arithmetic): ``|d|^p`` of an 8-bit step (≈ 1/765) would
    otherwise underflow float32 for ``p ≥ 16``.
    """
    if x.shape[1] == 1:
        if gray_mode == "identity":
            return x[:, 0]
        if gray_mode != "local_mean":
            raise ValueError(f"gray_mode must be one of {GRAY_MODES}, got {gray_mode!r}")
        local = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return (x - local).abs_()[:, 0]
    scale = min(64.0, (1e30 / x.shape[1]) ** (1.0 / p))  # keeps scale^p · C below float32's max
    d = (x - x.mean(dim=1, keepdim=True)).mul_(scale)
    if not (float(p).is_integer() and int(p) % 2 == 0):
        d = d.abs_()
    return d.pow_(p).sum(dim=1).pow_(1.0 / p).div_(scale)


def high_pass(sat: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Valid (unpadded) convolution of every map ``sat [B, H, W]`` with ``kernel [1, 1, k, k]``.

    Run as one depthwise convolution over a ``[1, B, H, W]`` tensor, which is about ten
    times faster on a CPU than a one-channel convolution over ``[B, 1, H, W]``.
    """
    b = sat.shape[0]
    k = kernel.to(sat.dtype)
    return F.conv2d(sat[None], k.expand(b, 1, -1, -1), groups=b)[0]


def batched_histogram(v: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Per-row histogram of ``v [B, N]`` → counts ``[B, bins]`` (float), like :func:`torch.histc`.

    Bins are equal over ``[lo, hi]``; a value equal to ``hi`` goes to the last bin; values
    outside ``[lo, hi]`` (and NaN) are ignored.  One ``bincount`` for the whole batch: an
    out-of-range value is sent to an extra per-row overflow slot that is then dropped.
    """
    b = v.shape[0]
    inside = (v >= lo) & (v <= hi)
    pos = (v - lo).mul_(bins / (hi - lo)).floor_().clamp_(0, bins - 1)
    idx = pos.to(torch.int64).masked_fill_(~inside, bins)
    idx += torch.arange(b, device=v.device)[:, None] * (bins + 1)
    counts = torch.bincount(idx.view(-1), minlength=b * (bins + 1)).view(b, bins + 1)
    return counts[:, :bins].to(v.dtype)


@dataclass
class Calibration:
    """What :meth:`SAEC.calibrate` chose and achieved (all rates in [0, 1])."""

    threshold: float
    clean_rejection_rate: float
    noisy_detection_rate: float
    auroc: float
    max_clean_rejection: float
    num_clean: int
    num_noisy: int
    noise_min: float
    noise_max: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class CalibrationScores:
    """What :meth:`SAEC.calibration_scores` measured: NL of the clean images ``[N]`` and of their
    noisy copies ``[N]`` (float64), the noise amplitude range, and with the luminance test a dict of
    ``clean_lum``, ``noisy_lum``, ``tied_lum`` (``[N, 3]`` statistics) and ``tied`` (``[N]`` NL of
    the channel-tied copies); ``None`` without it."""

    clean: torch.Tensor
    noisy: torch.Tensor
    noise_min: float
    noise_max: float
    luminance: dict[str, torch.Tensor] | None = None


@dataclass
class LuminanceCalibration:
    """The joint calibration of SAEC's two tests (``luminance=True``); rates in [0, 1].

    ``thresholds`` maps each luminance statistic (:data:`~mixdefense.layers.luminance.STATISTICS`)
    to its cut (reject above it; ``inf``: the statistic is off); ``clean_rejections`` maps
    ``"paper"`` and each statistic to the clean calibration images its cut rejects on its own
    (``-1``: off).  The rates are those of the OR (the whole layer) on the calibration images and
    their noisy copies.  :meth:`as_dict` writes an off cut as ``None`` (plain JSON).
    """

    thresholds: dict[str, float]
    clean_rejections: dict[str, int]
    clean_rejection_rate: float
    noisy_detection_rate: float
    tied_detection_rate: float
    max_clean_rejection: float

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}
        out["thresholds"] = {k: (None if math.isinf(v) else v) for k, v in self.thresholds.items()}
        return out


@register_layer
class SAEC(DetectorLayer):
    """The LP-defense layer: rejects inputs whose noise-level score is below a threshold.

    Args:
        p: exponent of the pseudo-saturation p-norm (eq. 1).
        kernel: name of the high-pass kernel (a key of :data:`KERNELS`).
        bins: number of histogram bins ``L``.
        value_range: the histogram covers ``[-value_range, value_range]`` (residual units,
            i.e. [0, 1] pixel scale times the kernel's gain).
        gray_mode: what SAEC computes for one-channel images (module docstring).
        luminance: add the luminance test (module docstring); ``False`` is the paper's SAEC.
        luminance_fraction: share in ``(0, 1]`` of the 2×2 blocks the flat-region statistic
            uses (:func:`~mixdefense.layers.luminance.flat_noise_level`); only with ``luminance``.

    ``score(x) -> [B]`` noise-level scores (smaller = noisier); ``forward(x) -> bool [B]``,
    True = rejected (``score < threshold``, or, with ``luminance``, a luminance statistic above its cut).  The threshold is ``nan`` until
    :meth:`calibrate` runs (or a calibrated ``state_dict`` is loaded); ``forward`` then raises.
    All settings and the calibration live in buffers and round-trip through ``state_dict``.
    """

    type_name = "saec"
    file_format = "mixdefense.saec/1"
    kind = "pre"  # sees the input before the classifier does

    def __init__(self, p: float = 8.0, kernel: str = "kv", bins: int = 64, value_range: float = 0.25, gray_mode: str = "local_mean",
                 luminance: bool = False, luminance_fraction: float = 0.1):
        super().__init__()
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        if value_range <= 0:
            raise ValueError(f"value_range must be > 0, got {value_range}")
        if gray_mode not in GRAY_MODES:
            raise ValueError(f"gray_mode must be one of {GRAY_MODES}, got {gray_mode!r}")
        self.kernel_name, self.gray_mode = kernel, gray_mode
        self.register_buffer("kernel", kernel_tensor(kernel))
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("bins", torch.tensor(int(bins)))
        self.register_buffer("value_range", torch.tensor(float(value_range)))
        self.register_buffer("gray_local_mean", torch.tensor(gray_mode == "local_mean"))
        self.register_buffer("threshold", torch.tensor(float("nan")))
        #: -1: reject when score < threshold (derived in the module docstring; never flipped).
        self.register_buffer("direction", torch.tensor(-1))
        self.register_buffer("calibration_stats", torch.full((8,), float("nan")))
        if not isinstance(luminance, bool):
            raise ValueError(f"luminance must be True or False, got {luminance!r}")
        if luminance:
            self._add_luminance(luminance_fraction)

    # -- the optional luminance test ------------------------------------------------------
    #: its buffers (registered only when the option is on, so the paper's state_dict is unchanged)
    LUMINANCE_BUFFERS = ("luminance_fraction", "luminance_thresholds", "luminance_stats")

    def _add_luminance(self, fraction: float) -> None:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"luminance_fraction must be in (0, 1], got {fraction}")
        self.register_buffer("luminance_fraction", torch.tensor(float(fraction)))
        self.register_buffer("luminance_thresholds", torch.full((len(lum.STATISTICS),), float("nan")))
        #: [OR clean rate, OR noisy rate, OR tied rate, max clean rejection, k_paper, k_global, k_flat, k_speckle]
        #: (k: calibration images a cut rejects alone, -1 = off)
        self.register_buffer("luminance_stats", torch.full((8,), float("nan")))

    def _drop_luminance(self) -> None:
        for name in self.LUMINANCE_BUFFERS:
            delattr(self, name)

    @property
    def luminance(self) -> bool:
        """Whether the luminance test is on."""
        return hasattr(self, "luminance_thresholds")

    # -- state -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        kernel = state_dict.get(prefix + "kernel")
        if kernel is not None and kernel.shape != self.kernel.shape:
            self.kernel = torch.empty_like(kernel)  # the saved layer may use another kernel size
        saved_luminance = prefix + "luminance_thresholds" in state_dict
        if saved_luminance and not self.luminance:
            self._add_luminance(0.1)  # the saved value replaces 0.1 below
        elif self.luminance and not saved_luminance:
            self._drop_luminance()  # a paper SAEC's state (every file written before the option existed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.gray_mode = "local_mean" if bool(self.gray_local_mean) else "identity"
        k = self.kernel.squeeze()
        self.kernel_name = next((n for n in KERNELS if kernel_tensor(n).squeeze().shape == k.shape and torch.allclose(kernel_tensor(n).squeeze(), k)), "custom")

    @property
    def calibrated(self) -> bool:
        if self.luminance and bool(torch.isnan(self.luminance_thresholds).any()):
            return False
        return not bool(torch.isnan(self.threshold))

    def settings(self) -> dict[str, object]:
        """The constructor's arguments; the luminance keys only when the option is on (a paper SAEC's
        settings, and so its file, are what they were before the option existed)."""
        out: dict[str, object] = {"p": float(self.p), "kernel": self.kernel_name, "bins": int(self.bins),
                                  "value_range": float(self.value_range), "gray_mode": self.gray_mode}
        if self.luminance:
            out.update(luminance=True, luminance_fraction=float(self.luminance_fraction))
        return out

    def luminance_calibration(self) -> LuminanceCalibration | None:
        """The joint calibration of the two tests (``None`` without the option or before calibration)."""
        if not self.luminance or bool(torch.isnan(self.luminance_thresholds).any()):
            return None
        s = self.luminance_stats.tolist()
        names = ("paper", *lum.STATISTICS)
        return LuminanceCalibration(dict(zip(lum.STATISTICS, self.luminance_thresholds.tolist())),
                                    {n: int(k) for n, k in zip(names, s[4:])}, s[0], s[1], s[2], s[3])

    def calibration(self) -> Calibration | None:
        if not self.calibrated:
            return None
        s = self.calibration_stats.tolist()
        return Calibration(float(self.threshold), s[0], s[1], s[2], s[3], int(s[4]), int(s[5]), s[6], s[7])

    def payload(self) -> dict:
        """The layer as plain tensors and settings (what its file and detector bundles store)."""
        return {"settings": self.settings(), "state_dict": {k: v.cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_payload(cls, payload: dict) -> SAEC:
        """Rebuild a layer from :meth:`payload`'s dict."""
        saec = cls(**{k: v for k, v in payload["settings"].items() if k != "kernel" or v in KERNELS})
        saec.load_state_dict(payload["state_dict"])
        return saec

    # -- scoring -----------------------------------------------------------------------
    def noise_contrast(self, x: torch.Tensor) -> torch.Tensor:
        """The high-pass-filtered pseudo-saturation map ``[B, H−k+1, W−k+1]``."""
        return high_pass(pseudo_saturation(x, float(self.p), self.gray_mode), self.kernel)

    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        """Fractions of the noise-contrast map's pixels per bin, ``[B, bins]``."""
        feat = self.noise_contrast(x).flatten(1)
        r = float(self.value_range)
        return batched_histogram(feat, int(self.bins), -r, r) / feat.shape[1]

    def check_input(self, x: object, name: str = "x") -> torch.Tensor:
        """Validate images for SAEC: ``[B, C, H, W]`` float in ``[0, 1]``, ``C ∈ {1, 3}``, and ``H, W`` at
        least the high-pass kernel's side (a valid convolution of a smaller image is empty)."""
        side = max(int(self.kernel.shape[-1]), lum.MIN_SIZE if self.luminance else 1)
        return check_images(x, channels=(1, 3), min_size=side, name=name)

    def score(self, x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """Noise-level scores ``[B]`` (eq. 2) of images ``x [B, C, H, W]`` in [0, 1], C ∈ {1, 3}."""
        if validate:
            self.check_input(x)
        with torch.no_grad():
            h = self.histogram(x.float())
            return h.var(dim=1, unbiased=False)  # (1/L) Σ (H[i] − μ)²

    def luminance_scores(self, x: torch.Tensor, *, validate: bool = True) -> torch.Tensor:
        """The luminance statistics ``[B, 3]`` (columns :data:`~mixdefense.layers.luminance.STATISTICS`,
        larger = noisier) of images ``x [B, C, H, W]`` in [0, 1]; only with ``luminance=True``."""
        if not self.luminance:
            raise RuntimeError("this SAEC has no luminance test (construct it with luminance=True)")
        if validate:
            self.check_input(x)
        with torch.no_grad():
            return lum.luminance_statistics(x.float(), float(self.luminance_fraction))

    def _luminance_margin(self, x: torch.Tensor) -> torch.Tensor:
        """``max_i s_i / t_i`` ``[B]`` over the luminance statistics: ``> 1`` exactly where one exceeds its cut."""
        t = self.luminance_thresholds.to(torch.float64).clamp_min(torch.finfo(torch.float32).tiny)
        return (self.luminance_scores(x, validate=False).double() / t).max(dim=1).values.float()

    def _require_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError("SAEC is not calibrated: call calibrate(...) or load a calibrated state_dict")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``True`` where the input is rejected as perturbed, ``[B]`` bool."""
        self._require_calibrated()
        rejected = self.score(x) < self.threshold
        if self.luminance:
            rejected |= self._luminance_margin(x) > 1
        return rejected

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """``threshold / NL`` ``[B]``: ``> 1`` exactly where the input is rejected (a score for ROC curves
        that composes with other layers' margins).  With the luminance test: the larger of that and
        ``max_i s_i / t_i`` over the luminance statistics."""
        self._require_calibrated()
        paper = self.threshold / self.score(x).clamp_min(torch.finfo(torch.float32).tiny)
        if self.luminance:
            paper = torch.maximum(paper, self._luminance_margin(x))
        return paper

    # -- calibration (paper §5.3) ---------------------------------------------------------
    @torch.no_grad()
    def calibrate(
        self,
        clean: torch.Tensor | Iterable,
        noise: tuple[float, float] = (4 / 255, 64 / 255),
        max_clean_rejection: float = 0.01,
        max_images: int | None = 10000,
        seed: int = 0,
        batch_size: int = 1000,
    ) -> Calibration:
        """Choose the threshold on clean images and uniform-noise copies of them (never AEs).

        Each clean image ``x`` gets one noisy copy ``clip(x + U(−a, a), 0, 1)`` with an
        amplitude ``a ~ U(noise[0], noise[1])`` drawn per image ([0, 1] pixel scale).  Among
        the thresholds whose clean false-rejection rate is ``≤ max_clean_rejection``, the one
        that maximises ``noisy detection − clean rejection`` is kept.

        With the luminance test, each clean image also gets a channel-tied copy
        ``clip(x + u·1, 0, 1)`` (one ``u [H, W]`` for all channels, amplitude drawn the same
        way, from a second generator seeded ``seed + 1`` so the paper's copies are unchanged).
        The paper's threshold and the three luminance cuts are then set jointly
        (:func:`~mixdefense.layers.luminance.allocate_thresholds`): the clean images the OR
        rejects plus one per active cut stay within ``⌊max_clean_rejection · (N + 1)⌋``
        (:func:`~mixdefense.layers.luminance.clean_budget`: so that a fresh clean image, not just
        a calibration one, is rejected at most at the bound), spent where the OR catches the most
        noisy copies of both kinds; a luminance statistic that catches nothing more stays off
        (threshold ``inf``).  The paper's test is always on.  The returned :class:`Calibration` is the
        paper test's own record at its joint threshold (AUROC unchanged);
        :meth:`luminance_calibration` has the OR's.

        Args:
            clean: a tensor ``[N, C, H, W]`` in [0, 1] or an iterable of such batches or of
                ``(images, labels)`` pairs (a DataLoader).
        Returns:
            the :class:`Calibration`, also stored in this module's buffers.
        """
        if not 0.0 <= max_clean_rejection < 1.0:
            raise ValueError(f"max_clean_rejection must be in [0, 1), got {max_clean_rejection}")
        scores = self.calibration_scores(clean, noise, max_images=max_images, seed=seed, batch_size=batch_size)
        return self.calibrate_from_scores(scores, max_clean_rejection)

    @torch.no_grad()
    def calibration_scores(self, clean: torch.Tensor | Iterable, noise: tuple[float, float] = (4 / 255, 64 / 255),
                           max_images: int | None = 10000, seed: int = 0, batch_size: int = 1000) -> CalibrationScores:
        """The scores :meth:`calibrate` chooses from (same arguments): the clean images and their
        noisy copies under NL and, with the luminance test, under its statistics.  Scoring once
        and calling :meth:`calibrate_from_scores` per clean budget gives what :meth:`calibrate`
        gives for each budget."""
        lo_a, hi_a = float(noise[0]), float(noise[1])
        if not 0.0 < lo_a <= hi_a:
            raise ValueError(f"noise amplitudes must satisfy 0 < min <= max, got {noise}")
        if isinstance(clean, torch.Tensor):
            self.check_input(clean, name="clean")
        elif not isinstance(clean, Iterable) or isinstance(clean, (str, bytes)):
            raise ValueError(f"clean: expected a torch.Tensor [N, C, H, W] in [0, 1] or an iterable of such batches, "
                             f"got {type(clean).__name__}")
        gen = torch.Generator().manual_seed(seed)
        tied_gen = torch.Generator().manual_seed(seed + 1) if self.luminance else None
        clean_scores, noisy_scores, seen = [], [], 0
        extra: dict[str, list[torch.Tensor]] = {"clean_lum": [], "noisy_lum": [], "tied": [], "tied_lum": []}
        batches = clean.split(batch_size) if isinstance(clean, torch.Tensor) else clean
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
            self.check_input(x, name="clean")
            if max_images is not None:
                x = x[: max_images - seen]
            if x.shape[0] == 0:
                break
            x = x.float().cpu()
            amp = lo_a + (hi_a - lo_a) * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
            noisy = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * amp).clamp(0, 1)
            clean_scores.append(self.score(x, validate=False))
            noisy_scores.append(self.score(noisy, validate=False))
            if tied_gen is not None:
                self._luminance_copies(x, noisy, lo_a, hi_a, tied_gen, extra)
            seen += x.shape[0]
            if max_images is not None and seen >= max_images:
                break
        if seen == 0:
            raise ValueError("calibrate: no clean images given")
        return CalibrationScores(torch.cat(clean_scores).double(), torch.cat(noisy_scores).double(), lo_a, hi_a,
                                 {k: torch.cat(v) for k, v in extra.items()} if tied_gen is not None else None)

    @torch.no_grad()
    def calibrate_from_scores(self, scores: CalibrationScores, max_clean_rejection: float = 0.01) -> Calibration:
        """:meth:`calibrate`'s choice on precomputed :meth:`calibration_scores` (of this layer's settings)."""
        if not 0.0 <= max_clean_rejection < 1.0:
            raise ValueError(f"max_clean_rejection must be in [0, 1), got {max_clean_rejection}")
        if (scores.luminance is not None) != self.luminance:
            raise ValueError("calibration scores and layer disagree on the luminance test: score with this layer")
        sc, sn, lo_a, hi_a = scores.clean, scores.noisy, scores.noise_min, scores.noise_max
        threshold, frr, tpr = choose_threshold_below(sc, sn, max_clean_rejection)
        auroc = detection_auroc(clean_scores=-sc, adv_scores=-sn)  # P(a noisy copy scores below a clean image)
        if auroc < 0.5:
            raise RuntimeError(
                f"SAEC calibration: noisy copies do not score below clean images (AUROC {auroc:.3f}); "
                "the settings (kernel, range, bins) do not separate noise on this data"
            )
        if scores.luminance is not None:
            threshold, frr, tpr = self._calibrate_jointly(sc, sn, scores.luminance, max_clean_rejection)
        cal = Calibration(threshold, frr, tpr, auroc, max_clean_rejection, len(sc), len(sn), lo_a, hi_a)
        self.threshold.fill_(threshold)
        self.calibration_stats.copy_(torch.tensor([frr, tpr, auroc, max_clean_rejection, len(sc), len(sn), lo_a, hi_a]))
        return cal

    def _luminance_copies(self, x: torch.Tensor, noisy: torch.Tensor, lo_a: float, hi_a: float,
                          gen: torch.Generator, out: dict[str, list[torch.Tensor]]) -> None:
        """Score one calibration batch for the luminance test: the clean images and the paper's noisy
        copies under the luminance statistics, and a channel-tied copy under both tests."""
        amp = lo_a + (hi_a - lo_a) * torch.rand(x.shape[0], 1, 1, 1, generator=gen)
        u = (2 * torch.rand((x.shape[0], 1, *x.shape[2:]), generator=gen) - 1) * amp
        tied = (x + u).clamp(0, 1)
        out["clean_lum"].append(self.luminance_scores(x, validate=False))
        out["noisy_lum"].append(self.luminance_scores(noisy, validate=False))
        out["tied"].append(self.score(tied, validate=False))
        out["tied_lum"].append(self.luminance_scores(tied, validate=False))

    def _calibrate_jointly(self, sc: torch.Tensor, sn: torch.Tensor, extra: dict[str, torch.Tensor],
                           max_clean_rejection: float) -> tuple[float, float, float]:
        """Set the paper threshold and the luminance cuts together (see :meth:`calibrate`); returns the
        paper test's ``(threshold, clean rejection rate, noisy detection rate)`` at its joint cut."""
        # one row per test, "larger = reject": −NL for the paper test, the statistics as they are
        clean = torch.cat([-sc[None], extra["clean_lum"].double().T])
        noisy = torch.cat([torch.cat([-sn, -extra["tied"].double()])[None],
                           torch.cat([extra["noisy_lum"], extra["tied_lum"]]).double().T])  # [4, 2N]
        budget = lum.clean_budget(max_clean_rejection, len(sc))
        cuts, ks = lum.allocate_thresholds(clean, noisy, budget, required=(0,))  # the paper's test stays on
        rejected = clean > cuts[:, None]
        caught = noisy > cuts[:, None]
        n_indep = len(sn)
        self.luminance_thresholds.copy_(cuts[1:].float())
        self.luminance_stats.copy_(torch.tensor([
            float(rejected.any(0).double().mean()), float(caught[:, :n_indep].any(0).double().mean()),
            float(caught[:, n_indep:].any(0).double().mean()), max_clean_rejection, *ks]))
        return -float(cuts[0]), float(rejected[0].double().mean()), float(caught[0, :n_indep].double().mean())


def choose_threshold_below(clean: torch.Tensor, noisy: torch.Tensor, max_clean_rejection: float) -> tuple[float, float, float]:
    """Threshold ``t`` for the rule "reject when score < t".

    Among thresholds with clean rejection rate ``≤ max_clean_rejection``, return the one
    maximising ``noisy detection − clean rejection`` (ties: the lower ``t``), as
    ``(t, clean_rejection_rate, noisy_detection_rate)``.  Candidates are midpoints
    between consecutive distinct observed scores, so no observed score sits on ``t``.
    """
    allv = torch.cat([clean, noisy]).unique()  # sorted
    cand = torch.cat([allv[:1] - 1e-12 - allv[:1].abs() * 1e-9, (allv[1:] + allv[:-1]) / 2])
    cs, ns = clean.sort().values, noisy.sort().values
    frr = torch.searchsorted(cs, cand, side="left").double() / len(cs)
    tpr = torch.searchsorted(ns, cand, side="left").double() / len(ns)
    ok = frr <= max_clean_rejection + 1e-12
    gain = torch.where(ok, tpr - frr, torch.full_like(tpr, -math.inf))
    best = int(torch.argmax(gain))  # first maximum = lowest threshold
    return float(cand[best]), float(frr[best]), float(tpr[best])

"""Input validation at the public boundaries of the defense.

A detector is security software: malformed input must fail loudly with a message that
names what was expected, never be silently clamped or crash deep inside a convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_images(
    x: object,
    *,
    channels: int | Sequence[int] | None = None,
    size: int | tuple[int, int] | None = None,
    min_size: int | None = None,
    square: bool = False,
    name: str = "x",
) -> torch.Tensor:
    """Validate a batch of images and return it unchanged.

    Args:
        x: expected a float tensor of shape ``[B, C, H, W]`` with values in ``[0, 1]``.
        channels: allowed channel count(s) ``C``; ``None`` accepts any.
        size: expected spatial size ``H`` (= ``W``) or ``(H, W)``; ``None`` accepts any.
        min_size: smallest ``H`` and ``W`` accepted (e.g. a filter's side); ``None``: any ``≥ 1``.
        square: require ``H == W``.
        name: the argument's name, used in error messages.

    Raises:
        ValueError: on a non-tensor, wrong rank, empty batch or empty images, integer/bool/complex
            dtype, wrong channel count or size, NaN/Inf, or values outside ``[0, 1]``.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of images [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch (shape {tuple(x.shape)}); expected at least one image")
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{name}: expected a floating-point tensor with values in [0, 1], got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: empty images (shape {tuple(x.shape)}); expected [B, C, H, W] with C, H, W >= 1")
    if channels is not None:
        allowed = (channels,) if isinstance(channels, int) else tuple(channels)
        if x.shape[1] not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != hw:
            raise ValueError(f"{name}: expected images of size {hw[0]}x{hw[1]}, got {x.shape[-2]}x{x.shape[-1]}")
    if square and x.shape[-2] != x.shape[-1]:
        raise ValueError(f"{name}: expected square images (H = W), got {x.shape[-2]}x{x.shape[-1]}")
    if min_size is not None and min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name}: expected images of at least {min_size}x{min_size} pixels, got {x.shape[-2]}x{x.shape[-1]}")
    lo_t, hi_t = torch.aminmax(x)  # one pass; NaN propagates into both
    lo, hi = lo_t.item(), hi_t.item()
    if lo != lo or hi != hi or lo in (float("inf"), float("-inf")) or hi in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: contains NaN or Inf values; expected finite values in [0, 1]")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: values must lie in [0, 1] (pixel scale), got range [{lo:.6g}, {hi:.6g}]")
    return x


def match_dtype(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``x`` (validated images) cast to the floating dtype of ``module``'s parameters or buffers.

    Casting float64 or float16 images in ``[0, 1]`` to float32 keeps them in ``[0, 1]`` (only
    rounding changes); without it a convolution fails deep inside with a dtype mismatch.
    """
    for t in (*module.parameters(), *module.buffers()):
        if torch.is_floating_point(t):
            return x if x.dtype == t.dtype else x.to(t.dtype)
    return x


def check_labels(y: object, batch: int, num_classes: int, *, name: str = "y") -> torch.Tensor:
    """Validate integer class labels of shape ``[B]`` with values in ``[0, num_classes)``."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of labels [B], got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}], got {tuple(y.shape)}")
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor, got dtype {y.dtype}")
    if y.numel() and (y.min().item() < 0 or y.max().item() >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), got range [{y.min().item()}, {y.max().item()}]")
    return y

"""``mixdefense detect --bundle PATH IMAGE... [--json]``: run a detector bundle on image files.

Inputs: PNG / JPEG / BMP files, folders of them (not recursive), or ``.pt`` files holding a
float tensor ``[N, C, H, W]`` (or ``[C, H, W]``) in ``[0, 1]``.  Files are converted to what the
bundle's classifier expects: grayscale ↔ RGB by channel count, and resized (bilinear,
antialiased) to its side length.  A ``.pt`` tensor is taken as model input: it must already
have the right channel count and size (it is never recoloured, resized or rescaled).  Anything else — a missing or corrupt
file, an unknown extension, a tensor of the wrong rank, channels or value range — stops
the command with a clear message and exit code 2, before any detection runs.

Output: one line per image with the predicted label, ``accepted`` or ``REJECTED by <layer>``
(a rejection by a pre-classifier layer has no label: the classifier never saw the image),
or with ``--json`` one JSON list of ``{"input", "label", "rejected", "layer"}`` records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mixdefense.io import load_plain
from mixdefense.validation import check_images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class InputError(ValueError):
    """An input the detector cannot take, with the reason."""


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files named directly, plus the image and ``.pt`` files of named folders (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS + (".pt",))
            if not found:
                raise InputError(f"{p}: folder holds no {', '.join(IMAGE_EXTENSIONS)} or .pt files")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return out


def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def read_image(path: Path, channels: int, side: int) -> torch.Tensor:
    """``[1, channels, side, side]`` in ``[0, 1]`` from an image file (converted and resized)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from err
    return _resize(pil_to_tensor(img).float().div(255)[None], side)


def read_tensor(path: Path, channels: int, side: int) -> torch.Tensor:
    """``[N, channels, side, side]`` from a ``.pt`` tensor file (``weights_only`` load, validated as is)."""
    try:
        t = load_plain(path, "tensor")
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from err
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{path}: expected a tensor [N, C, H, W], found {type(t).__name__}")
    if t.dim() == 3:
        t = t[None]
    try:
        check_images(t, channels=channels, size=side, name=str(path))
    except ValueError as err:
        raise InputError(str(err)) from err
    return t.float()


def load_inputs(paths: list[str], channels: int, side: int) -> tuple[torch.Tensor, list[str]]:
    """All inputs as one batch, and a name per image (``file`` or ``file[i]`` for tensors)."""
    images, names = [], []
    for path in expand_inputs(paths):
        suffix = path.suffix.lower()
        if suffix == ".pt":
            t = read_tensor(path, channels, side)
            names += [f"{path}[{i}]" for i in range(len(t))] if len(t) > 1 else [str(path)]
        elif suffix in IMAGE_EXTENSIONS:
            t = read_image(path, channels, side)
            names.append(str(path))
        else:
            raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; use {', '.join(IMAGE_EXTENSIONS)} or .pt")
        images.append(t)
    if not images:
        raise InputError("no inputs")
    return torch.cat(images), names


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mixdefense detect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="detector bundle (e.g. artifacts/mnist/detector.pt)")
    ap.add_argument("inputs", nargs="+", help="image files, folders, or .pt tensor files")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of text lines")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--speed", default="fp32", metavar="VARIANT",
                    help="speed settings of the networks (mixdefense.speed): fp32 (default) or '+'-joined from "
                         "channels_last, bf16, bf16_layers, compile; benchmarks/results/throughput_<ds>.md says which "
                         "agree with fp32 on >= 99.9 %% of the test images")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        print(f"mixdefense detect: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    from mixdefense.pipeline import load_detector
    from mixdefense.speed import accelerate, parse_variant

    try:
        parse_variant(args.speed)
    except ValueError as err:
        print(f"mixdefense detect: --speed: {err}", file=sys.stderr)
        return 2
    try:
        detector = accelerate(load_detector(args.bundle).eval(), args.speed)
    except (FileNotFoundError, ValueError) as err:
        print(f"mixdefense detect: {err}", file=sys.stderr)
        return 2
    clf = detector.classifier
    try:
        x, names = load_inputs(args.inputs, clf.in_channels, clf.image_size)
    except InputError as err:
        print(f"mixdefense detect: {err}", file=sys.stderr)
        return 2
    records = []
    for start in range(0, len(x), args.batch_size):
        v = detector.detect(x[start:start + args.batch_size])
        for i in range(len(v.labels)):
            layer = v.layer_names[int(v.layer[i])] if bool(v.rejected[i]) else None
            label = int(v.labels[i])
            records.append({"input": names[start + i], "label": label if label >= 0 else None,
                            "rejected": bool(v.rejected[i]), "layer": layer})
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        width = max(len(r["input"]) for r in records)
        for r in records:
            label = "-" if r["label"] is None else str(r["label"])
            verdict = f"REJECTED by {r['layer']}" if r["rejected"] else "accepted"
            print(f"{r['input']:<{width}}  label {label:>3}  {verdict}")
        n_rej = sum(r["rejected"] for r in records)
        print(f"{len(records)} image(s): {len(records) - n_rej} accepted, {n_rej} rejected")
    return 0

"""``mixdefense cgan evaluate --dataset <ds> [options]``: is the trained cGAN fit for ContraNet?

Loads the exported cGAN (``artifacts/<ds>/cgan.pt``, written at the end of
``mixdefense fit --config experiments/<ds>/cgan.yaml``) and the dataset's classifier, then on
test images reports (see :mod:`mixdefense.evaluation.reconstruction`):

* faithfulness: mean / median SSIM and MSE of true-label reconstructions ``G(μ(x), y)``;
* label binding: share of ``(x, y′)`` pairs, over **all** wrong labels ``y′``, that the
  classifier labels ``y′``, overall and per label;

and writes ``<out>/cgan_eval.json`` and ``<out>/figure8.png`` (input, true-label
reconstruction, six other labels, for 8 test images).  Data arrives through the
``load_images`` callable :mod:`mixdefense.cli` passes in.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from mixdefense.classifiers import load_classifier
from mixdefense.commands import Data
from mixdefense.evaluation.reconstruction import evaluate_reconstructions, figure8_grid
from mixdefense.io import atomic_write_text
from mixdefense.nets import load_cgan

LoadImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def parse_args(argv: list[str], data: Data) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mixdefense cgan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["evaluate"])
    data.add_dataset_argument(ap)
    ap.add_argument("--weights", help="exported cGAN (default artifacts/<dataset>/cgan.pt)")
    ap.add_argument("--classifier", help="classifier judging binding (default artifacts/<dataset>/classifier.pt)")
    ap.add_argument("--num-images", type=int, default=1000, help="first N test images (0: all)")
    ap.add_argument("--out", help="report folder (default results/<dataset>/cgan)")
    ap.add_argument("--batch-size", type=int, default=250)
    return ap.parse_args(argv)


def evaluate(args: argparse.Namespace, load_images: LoadImages) -> dict:
    weights = Path(args.weights or f"artifacts/{args.dataset}/cgan.pt")
    classifier_path = Path(args.classifier or f"artifacts/{args.dataset}/classifier.pt")
    out = Path(args.out or f"results/{args.dataset}/cgan")
    cgan = load_cgan(weights)
    classifier = load_classifier(classifier_path)
    x, y = load_images(args.dataset, "test", args.num_images or None, image_size=cgan.image_size)
    if x.shape[1] != cgan.in_channels:
        raise ValueError(f"{weights} expects {cgan.in_channels}-channel images, {args.dataset} has {x.shape[1]}")
    start = time.perf_counter()
    report = evaluate_reconstructions(cgan.encoder, cgan.generator, classifier, x, y, cgan.num_classes,
                                      batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    grid = figure8_grid(cgan, x[:8], y[:8], cgan.num_classes)
    torchvision.utils.save_image(grid, out / "figure8.png")
    record = json.loads(weights.with_suffix(".json").read_text()) if weights.with_suffix(".json").exists() else {}
    result = {"dataset": args.dataset, "weights": str(weights), "classifier": str(classifier_path),
              "training": {k: record.get(k) for k in ("epochs", "global_step", "train_s")},
              "eval_seconds": round(seconds, 1), **report.as_dict()}
    atomic_write_text(out / "cgan_eval.json", json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str], data: Data) -> int:
    args = parse_args(argv, data)
    r = evaluate(args, data.load_images)
    print(f"{args.dataset}: {r['num_images']} test images — SSIM mean {r['ssim_mean']:.3f} (median {r['ssim_median']:.3f}), "
          f"MSE {r['mse_mean']:.4f}; label binding {r['binding']:.3f} over all wrong labels; "
          f"true-label reconstructions classified correctly {r['true_label_accuracy']:.3f}")
    print(f"wrote {Path(args.out or f'results/{args.dataset}/cgan')}/cgan_eval.json and figure8.png")
    return 0

"""Where SAEC's 1 % clean-rejection threshold sits: clean score quantiles against uniform noise.

    python benchmarks/saec_clean_tail.py --dataset gtsrb [--n 4000] [--layer artifacts/gtsrb/saec.pt]

No attack is used.  The shipped (calibrated) SAEC layer scores ``n`` clean training images
and uniform-noise copies of the same images at fixed amplitudes (1/255 units).  Reported:
the clean noise-level quantiles (0.1, 1, 5, 50 %), the noisy medians, the share of each noisy
set below the layer's threshold, the share of clean images scoring *below* each noisy
median (clean images that already look as "noisy" as a perturbed copy), and the brightness
and contrast of the 1 % lowest-scoring clean images against all.  A grid of the 48
lowest-scoring clean images is saved: they show which clean content the threshold has to
let through.  Writes ``benchmarks/results/saec_clean_tail_<dataset>.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchvision.utils import save_image

from datamodules import DATAMODULES
from mixdefense.layers.saec import SAEC

AMPLITUDES = (4, 8, 16)
QUANTILES = (0.001, 0.01, 0.05, 0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATAMODULES), required=True)
    ap.add_argument("--n", type=int, default=4000, help="clean training images")
    ap.add_argument("--layer", default=None, help="calibrated SAEC (default artifacts/<dataset>/saec.pt)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    saec = SAEC.load(args.layer or f"artifacts/{args.dataset}/saec.pt")
    if not saec.calibrated:
        raise SystemExit("the SAEC layer is not calibrated: run `make saec DATASET=...` first")

    dm = DATAMODULES[args.dataset](data_root=args.data_root, val_fraction=0.0)
    dm.setup("fit")
    images = dm.data_train.images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[: args.n]
    clean = images[order].float() / 255
    unit = 2 * torch.rand(clean.shape, generator=torch.Generator().manual_seed(1)) - 1

    with torch.no_grad():
        clean_scores = saec.score(clean)
        noisy_scores = {a: saec.score((clean + unit * a / 255).clamp(0, 1)) for a in AMPLITUDES}
    threshold = float(saec.threshold)
    tail = clean_scores.argsort()[: max(1, args.n // 100)]
    report = {
        "dataset": args.dataset, "images": args.n, "settings": saec.settings(), "threshold": threshold,
        "clean_quantiles": {str(q): clean_scores.quantile(q).item() for q in QUANTILES},
        "clean_rejected": (clean_scores < threshold).float().mean().item(),
        "noise": {
            str(a): {"median": s.median().item(), "rejected": (s < threshold).float().mean().item(),
                     "clean_below_noisy_median": (clean_scores < s.median()).float().mean().item()}
            for a, s in noisy_scores.items()
        },
        "lowest_1pct_clean": {"mean_brightness": clean[tail].mean().item(),
                              "mean_contrast_std": clean[tail].std(dim=(1, 2, 3)).mean().item()},
        "all_clean": {"mean_brightness": clean.mean().item(),
                      "mean_contrast_std": clean.std(dim=(1, 2, 3)).mean().item()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_image(clean[clean_scores.argsort()[:48]], out / f"saec_clean_tail_{args.dataset}.png", nrow=12, padding=1)
    (out / f"saec_clean_tail_{args.dataset}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Validation accuracy against training time, from a classifier run's CSV log.

    python benchmarks/classifier_curves.py --dataset cifar10 [--csv runs/cifar10/classifier/csv/version_0/metrics.csv]

Writes runs/<dataset>/classifier/classifier_curve.{csv,png} (--out: e.g. results/<dataset>/classifier for the shipped classifier): one row per epoch with the training
seconds so far (``time/train_s``, validation excluded) and the validation accuracy.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(path: Path) -> list[tuple[int, float, float]]:
    """``(epoch, train seconds, val accuracy)`` per epoch from a Lightning CSVLogger file."""
    time_by_epoch, acc_by_epoch = {}, {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get("epoch") in (None, ""):
                continue
            e = int(row["epoch"])
            if row.get("time/train_s"):
                time_by_epoch[e] = float(row["time/train_s"])
            if row.get("val/acc"):
                acc_by_epoch[e] = float(row["val/acc"])
    return [(e, time_by_epoch[e], acc_by_epoch[e]) for e in sorted(time_by_epoch) if e in acc_by_epoch]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--csv", default=None, help="default: the newest runs/<dataset>/classifier/csv/version_*/metrics.csv with a time column")
    ap.add_argument("--out", default=None, help="output folder (default runs/<dataset>/classifier)")
    args = ap.parse_args(argv)
    if args.csv:
        path = Path(args.csv)
    else:
        candidates = sorted(Path(f"runs/{args.dataset}/classifier/csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
        candidates = [p for p in candidates if "time/train_s" in p.read_text().splitlines()[0]]
        if not candidates:
            raise SystemExit(f"no training CSV with time/train_s under runs/{args.dataset}/classifier/csv")
        path = candidates[-1]
    curve = read_curve(path)
    out = Path(args.out or f"runs/{args.dataset}/classifier")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "classifier_curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_seconds", "val_acc"])
        w.writerows(curve)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([t / 60 for _, t, _ in curve], [a * 100 for _, _, a in curve], marker="o", ms=3)
    ax.set_xlabel("training time (min, this CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{args.dataset}: accuracy against training time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "classifier_curve.png", dpi=120)
    print(f"{len(curve)} epochs from {path} -> {out}/classifier_curve.{{csv,png}}; last: epoch {curve[-1][0]}, "
          f"{curve[-1][1]:.0f} s, val acc {curve[-1][2]:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

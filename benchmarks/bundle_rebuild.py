"""Rebuild each shipped detector bundle from the parts beside it and compare verdicts.

For every dataset: ``mixdefense bundle --dataset <ds> --out <tmp>`` (ContraNet recalibrated at the
operating point of ``experiments/<ds>/detector.yaml``, exactly as the shipped bundle was), then
both bundles judge the first ``--images`` clean test images, and the same images' FGSM AEs at
8/255 against the classifier (so that rejections happen); the verdicts (label, accepted or
rejected, which layer) must agree on every image; the report also says whether the files are
bit-identical.  ``--ship`` replaces ``artifacts/<ds>/detector.pt``
by the rebuilt file (which records the sha256 of its parts) when they agree on 100 %.

    python benchmarks/bundle_rebuild.py --datasets mnist cifar10 gtsrb [--ship]

Writes ``benchmarks/results/bundle_rebuild.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixdefense.attacks import run_attack
from mixdefense.cli import _data
from mixdefense.commands.bundle import build
from mixdefense.pipeline import load_detector


def agreement(a, b, x: torch.Tensor, batch_size: int = 250) -> dict:
    """Share of images on which the two detectors give the same label, verdict and rejecting layer."""
    same = {"label": 0, "rejected": 0, "layer": 0, "all": 0}
    for xb in x.split(batch_size):
        va, vb = a.detect(xb), b.detect(xb)
        eq = {"label": va.labels == vb.labels, "rejected": va.rejected == vb.rejected, "layer": va.layer == vb.layer}
        eq["all"] = eq["label"] & eq["rejected"] & eq["layer"]
        for k in same:
            same[k] += int(eq[k].sum())
    return {k: v / len(x) for k, v in same.items()} | {"images": len(x)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10", "gtsrb"])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--ship", action="store_true", help="replace artifacts/<ds>/detector.pt when the verdicts agree on 100 %")
    ap.add_argument("--out", default="benchmarks/results/bundle_rebuild.json")
    args = ap.parse_args(argv)
    data, report = _data(), {}
    for ds in args.datasets:
        t0 = time.perf_counter()
        shipped_path = Path(f"artifacts/{ds}/detector.pt")
        with tempfile.TemporaryDirectory() as tmp:
            rebuilt_path = Path(tmp) / "detector.pt"
            command = f"mixdefense bundle --dataset {ds} --out artifacts/{ds}/detector.pt"
            build(ds, data, Path(f"artifacts/{ds}"), rebuilt_path, keep_thresholds=False, check_images=args.images,
                  command=command)
            shipped, rebuilt = load_detector(shipped_path), load_detector(rebuilt_path)
            x, y = data.load_images(ds, "test", args.images)
            torch.manual_seed(0)
            x_adv = torch.cat([run_attack("fgsm", shipped.classifier, xb, yb, 8 / 255)
                               for xb, yb in zip(x.split(250), y.split(250))])
            row = {"clean": agreement(shipped, rebuilt, x), "fgsm_8": agreement(shipped, rebuilt, x_adv),
                   "thresholds": {"shipped": shipped.record.get("contranet_calibration", {}).get("thresholds"),
                                  "rebuilt": rebuilt.record["contranet_calibration"]["thresholds"]},
                   "part_sha256": rebuilt.record["part_sha256"]}
            row["identical"] = row["clean"]["all"] == 1.0 and row["fgsm_8"]["all"] == 1.0
            row["bytes_identical"] = rebuilt_path.read_bytes() == shipped_path.read_bytes()
            if args.ship and row["identical"]:
                shutil.copyfile(rebuilt_path, shipped_path)
                row["shipped"] = str(shipped_path)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report[ds] = row
        print(f"{ds:8s} clean {100 * row['clean']['all']:.1f} %  FGSM 8/255 {100 * row['fgsm_8']['all']:.1f} %  "
              f"thresholds {row['thresholds']['shipped']} -> {row['thresholds']['rebuilt']}  "
              f"{'bit-identical file' if row['bytes_identical'] else 'file bytes differ'}  "
              f"{'shipped' if row.get('shipped') else ''} ({row['seconds']} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["identical"] for r in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

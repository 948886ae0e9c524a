"""SAEC throughput, side by side with the CPU classifier's forward pass on the same batch.

    python benchmarks/saec_speed.py [--batch 4096] [--repeats 10] [--classifier artifacts/cifar10/classifier.pt]

Scores CIFAR-sized images (3×32×32, real CIFAR-10 test images tiled to the batch size when
the data is present, uniform random images otherwise), input validation included, in
one process with the classifier's forward timed on the very same batch.  Targets (issue
3): ≥ 20,000 images/s, and SAEC ≤ 5 % of the classifier's forward time.  Writes
benchmarks/results/saec_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from mixdefense.classifiers import Classifier, load_classifier
from mixdefense.layers.saec import SAEC


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--classifier", default="artifacts/cifar10/classifier.pt")
    ap.add_argument("--out", default="benchmarks/results/saec_speed.json")
    args = ap.parse_args(argv)

    x = None
    try:
        from datamodules import CIFAR10DataModule

        dm = CIFAR10DataModule()
        dm.setup("test")
        imgs = dm.data_test.images.float() / 255
        x = imgs.repeat((args.batch + len(imgs) - 1) // len(imgs), 1, 1, 1)[: args.batch].contiguous()
        source = "CIFAR-10 test images"
    except Exception:  # no data here: random images of the same size
        x = torch.rand(args.batch, 3, 32, 32)
        source = "uniform random images"
    if Path(args.classifier).exists():
        model, model_name = load_classifier(args.classifier), args.classifier
    else:
        model = Classifier("resnet_small", 10, 3, 32, dataset="cifar10", arch_kwargs={"blocks": [3, 3, 3], "widths": [16, 32, 64]}).eval()
        model_name = "ResNet-20 (untrained; same cost)"
    saec = SAEC()
    t_saec = _time(lambda: saec.score(x), args.repeats)

    @torch.no_grad()
    def forward():
        for chunk in x.split(512):
            model(chunk)

    t_clf = _time(forward, max(2, args.repeats // 3))
    result = {
        "batch": args.batch, "images": source, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "saec_seconds": t_saec, "saec_images_per_s": args.batch / t_saec,
        "classifier": model_name, "classifier_forward_seconds": t_clf, "classifier_images_per_s": args.batch / t_clf,
        "saec_over_classifier": t_saec / t_clf,
        "targets": {"saec_images_per_s": 20000, "saec_over_classifier": 0.05},
    }
    result["meets_targets"] = result["saec_images_per_s"] >= 20000 and result["saec_over_classifier"] <= 0.05
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where ContraNet's threshold should come from: validation images or test images of other physical objects.

    python benchmarks/calibration_shift.py --dataset gtsrb [--n 2000] [--frr 0.01 0.02 0.05]

ContraNet (the shipped ``artifacts/<ds>/cgan.pt`` + ``metric.pt``) scores, with the labels the
classifier predicts, ``n`` clean images of three sets: the validation split, the protocol's
selection split and the first ``n`` images of its test split (the ones the evaluations use;
``mixdefense.splits``: on GTSRB selection and test hold different physical signs).  For each
target false-rejection rate the threshold is set on the *correctly classified* validation
images and, separately, on the correctly classified selection images (the protocol's rule);
reported is the false rejection each threshold gives on the evaluated test images (all of them,
and the correctly classified ones: the ones whose rejection costs clean accuracy).  A calibration set is sound when its
threshold gives the target on the test images.  Writes
``benchmarks/results/calibration_shift_<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixdefense.classifiers import load_classifier
from mixdefense.cli import load_images
from mixdefense.layers.contranet import ContraNet
from mixdefense.nets import load_cgan, load_metric


def scores(contranet: ContraNet, classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 500):
    """``(ContraNet scores [N], classifier correct [N])`` with the predicted labels."""
    with torch.no_grad():
        pred = torch.cat([classifier(b).argmax(1) for b in x.split(batch)])
        s = torch.cat([contranet.score(xb, pb) for xb, pb in zip(x.split(batch), pred.split(batch))])
    return s, pred == y


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("mnist", "cifar10", "gtsrb"), required=True)
    ap.add_argument("--n", type=int, default=2000, help="images per set")
    ap.add_argument("--frr", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="target false-rejection rates")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    ds = args.dataset
    classifier = load_classifier(f"artifacts/{ds}/classifier.pt")
    contranet = ContraNet(load_cgan(f"artifacts/{ds}/cgan.pt"), load_metric(f"artifacts/{ds}/metric.pt"))
    sets = {name: scores(contranet, classifier, *load_images(ds, split, args.n))
            for name, split in (("validation", "val"), ("selection", "selection"), ("test", "test"))}
    test_s, test_ok = sets["test"]
    report = {"dataset": ds, "images_per_set": args.n,
              "classifier_accuracy": {k: ok.float().mean().item() for k, (_, ok) in sets.items()}, "rows": []}
    for frr in args.frr:
        for source in ("validation", "selection"):
            s, ok = sets[source]
            t = s[ok].quantile(1 - frr).item()
            report["rows"].append({"target_frr": frr, "threshold_from": source, "threshold": t,
                                   "test_frr": (test_s > t).float().mean().item(),
                                   "test_frr_correct": (test_s[test_ok] > t).float().mean().item()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"calibration_shift_{ds}.json").write_text(json.dumps(report, indent=1) + "\n")
    print("classifier accuracy: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in report["classifier_accuracy"].items()))
    print("| target FRR | threshold from | test FRR (all) | test FRR (correctly classified) |\n|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {100 * r['target_frr']:g} % | {r['threshold_from']} | {100 * r['test_frr']:.2f} % | "
              f"{100 * r['test_frr_correct']:.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Whether ContraNet's thresholds transfer from the calibration images to new ones (clean images only).

    python benchmarks/calibration_shift.py --dataset gtsrb [--calibration val val_groups] [--measure selection]
        [--cgan FILE --metric FILE] [--n 2000] [--frr 0.01 0.02 0.05] [--name SUFFIX]

ContraNet (``--cgan`` + ``--metric``, default the shipped ``artifacts/<ds>/cgan.pt`` + ``metric.pt``) scores
clean images with the labels the classifier predicts.  For each calibration split (``--calibration``:
``val``, the random validation frames, and/or ``val_groups``, whole held-out groups such as GTSRB's sign
tracks; :mod:`mixdefense.splits`) and each target rate, the threshold is set as the protocol sets it, on
the *correctly classified* calibration images; reported is the false rejection that threshold gives on
the correctly classified images of each measured split (``--measure``, default the selection split,
where operating points are chosen; the rejection of a correctly classified image is what costs clean
accuracy), and beside it (``class_mix_frr_<split>``) the rate the calibration images' per-class rates
predict for that split's class mix: when the two agree, the shift is the class mix, not new signs.  A calibration split is sound when the measured rate is the target.  Parts trained with the
random validation split have seen the ``val_groups`` images, so ``val_groups`` is refused for them
(:func:`mixdefense.io.check_calibration_held_out`).  The shipped SAEC's clean rejection of each set is
reported beside (its own threshold, from noise).  Writes ``benchmarks/results/calibration_shift_<ds>[_<name>].json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixdefense.classifiers import load_classifier
from mixdefense.cli import load_images
from mixdefense.io import check_calibration_held_out
from mixdefense.layers.contranet import ContraNet
from mixdefense.layers.saec import SAEC
from mixdefense.nets import load_cgan, load_metric


def scores(contranet: ContraNet, classifier, x: torch.Tensor, y: torch.Tensor, batch: int = 500):
    """``(ContraNet scores [N], classifier correct [N], true labels [N])`` with the predicted labels."""
    with torch.no_grad():
        pred = torch.cat([classifier(b).argmax(1) for b in x.split(batch)])
        s = torch.cat([contranet.score(xb, pb) for xb, pb in zip(x.split(batch), pred.split(batch))])
    return s, pred == y, y


def class_mix_rate(s: torch.Tensor, y: torch.Tensor, t: float, y_target: torch.Tensor) -> float | None:
    """The rejection the calibration images' per-class rates predict for a set whose labels are ``y_target``:
    ``sum_c share_c(target) * mean(s[y == c] > t)`` over the target's classes (``None`` when the calibration
    images lack one of them).  Equal to the measured rate when only the class mix differs between the sets."""
    total = 0.0
    for c, n in zip(*torch.unique(y_target, return_counts=True)):
        sc = s[y == c]
        if sc.numel() == 0:
            return None
        total += n.item() / y_target.numel() * (sc > t).float().mean().item()
    return total


def shift_report(sets: dict[str, tuple[torch.Tensor, torch.Tensor]], calibration: list[str], measure: list[str],
                 frrs: list[float]) -> list[dict]:
    """One row per (calibration split, target rate): the threshold (the ``1 - frr`` quantile of the correctly
    classified calibration scores) and the rejected share of the correctly classified images of every split of
    ``sets`` named in ``measure`` (and of the calibration split itself)."""
    rows = []
    for source in calibration:
        s, ok, y = sets[source]
        for frr in frrs:
            t = s[ok].quantile(1 - frr).item()
            row = {"calibration": source, "target_frr": frr, "threshold": t}
            for name in [source, *measure]:
                ms, mok, my = sets[name]
                row[f"frr_{name}"] = (ms[mok] > t).float().mean().item()
                if name != source:
                    row[f"class_mix_frr_{name}"] = class_mix_rate(s[ok], y[ok], t, my[mok])
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("mnist", "cifar10", "gtsrb"), required=True)
    ap.add_argument("--cgan", default=None, help="cGAN file (default artifacts/<ds>/cgan.pt)")
    ap.add_argument("--metric", default=None, help="metric model file (default artifacts/<ds>/metric.pt)")
    ap.add_argument("--calibration", nargs="+", default=["val"], choices=("val", "val_groups"),
                    help="calibration splits compared")
    ap.add_argument("--measure", nargs="+", default=["selection"], choices=("selection", "test"),
                    help="splits the thresholds are measured on (choices are made on the selection split)")
    ap.add_argument("--n", type=int, default=2000, help="images per set (the first n)")
    ap.add_argument("--frr", type=float, nargs="+", default=[0.01, 0.02, 0.05], help="target false-rejection rates")
    ap.add_argument("--name", default="", help="suffix of the report's file name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    ds = args.dataset
    cgan_file, metric_file = args.cgan or f"artifacts/{ds}/cgan.pt", args.metric or f"artifacts/{ds}/metric.pt"
    for split in args.calibration:
        check_calibration_held_out(split, {"cGAN": cgan_file, "M": metric_file})
    classifier = load_classifier(f"artifacts/{ds}/classifier.pt")
    contranet = ContraNet(load_cgan(cgan_file), load_metric(metric_file))
    saec = SAEC.load(f"artifacts/{ds}/saec.pt")
    sets, saec_rejects = {}, {}
    for split in dict.fromkeys([*args.calibration, *args.measure]):
        x, y = load_images(ds, split, args.n)
        sets[split] = scores(contranet, classifier, x, y)
        with torch.no_grad():
            saec_rejects[split] = torch.cat([saec(b) for b in x.split(500)]).float().mean().item()
    report = {"dataset": ds, "cgan": cgan_file, "metric": metric_file, "images_per_set": args.n,
              "classifier_accuracy": {k: ok.float().mean().item() for k, (_, ok, _) in sets.items()},
              "saec_clean_rejection": saec_rejects,
              "rows": shift_report(sets, args.calibration, args.measure, args.frr)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"calibration_shift_{ds}{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("classifier accuracy: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in report["classifier_accuracy"].items()))
    print("SAEC clean rejection: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in saec_rejects.items()))
    names = list(dict.fromkeys([*args.calibration, *args.measure]))
    print("| calibration | target | threshold | " + " | ".join(f"rejected, {n}" for n in names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for r in report["rows"]:
        cells = [(f"{100 * r[f'frr_{n}']:.2f} %" if f"frr_{n}" in r else "")
                 + (f" (class mix: {100 * r[f'class_mix_frr_{n}']:.2f} %)" if r.get(f"class_mix_frr_{n}") is not None else "")
                 for n in names]
        print(f"| {r['calibration']} | {100 * r['target_frr']:g} % | {r['threshold']:.4f} | " + " | ".join(cells) + " |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

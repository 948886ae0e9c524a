"""Compare detector bundles on the selection split, on the same oblivious AEs: a light sweep for choices.

    python benchmarks/operating_points.py --dataset gtsrb --bundles A.pt B.pt ... [--names a b ...]
        [--n-clean 2000] [--n-attacked 300] [--name SUFFIX]

Bundles that differ in their operating point (which clean images set the thresholds, how the clean budget
is split between SAEC and ContraNet, ContraNet's score) must share the classifier: the AEs are made once,
against the bare classifier (oblivious attacker), and every bundle judges the same ones.  The points:
FGSM and 50-step PGD L∞ at 2, 4, 8, 16, 32 /255, 50-step PGD L2 at 0.25, 0.5, 1, 2 (the registry's
strength; :mod:`mixdefense.attacks`), from the first ``--n-attacked`` correctly classified images of the
selection split.  Per bundle and point the sweep's own metrics (:func:`mixdefense.evaluation.points.
point_metrics`: detection of the successful AEs, Acc_detector (eq. 7, clean and AE halves), AUROC of the
composite's ``max`` margin, with 95 % intervals); the clean set is the correctly classified images among the
first ``--n-clean`` selection images (their rejection is the clean cost).  Fewer images and points than
``make evaluate``: a tool for choosing on the selection split, never a reported result.  Writes
``benchmarks/results/operating_points_<ds>[_<name>].json``.

Each bundle is also read with its last layer (ContraNet) re-cut so that the composite rejects exactly
1 % and 2 % of the correctly classified selection images (``at_selection_<rate>``): bundles whose
thresholds drift by different amounts from their calibration images compared at the same real clean
cost.  That cut is read on the selection split, where operating points are chosen; it is never a
reported result.  ``--ae-cache FILE`` keeps the AEs so a later run judges other bundles on the same ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixdefense.attacks import run_sweep
from mixdefense.calibration import margin_cutoffs
from mixdefense.cli import load_images
from mixdefense.evaluation.points import point_metrics
from mixdefense.metrics import wilson_interval
from mixdefense.pipeline import load_detector

#: clean rejection rates of the selection images at which every bundle is also read (its last layer re-cut)
EQUAL_RATES = (0.01, 0.02)
POINTS = {"fgsm": [e / 255 for e in (2, 4, 8, 16, 32)], "pgd_linf": [e / 255 for e in (2, 4, 8, 16, 32)],
          "pgd_l2": [0.25, 0.5, 1.0, 2.0]}


@torch.no_grad()
def judge(detector, x: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(labels [N], rejected [N], score [N])`` of a bundle: the composite's verdict and its ``max`` margin."""
    labels, margins = layer_margins(detector, x, batch)
    return (labels, *verdict(detector, labels, margins))


def verdict(detector, labels: torch.Tensor, margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rejected [N], score [N])`` from :func:`layer_margins`' table: the composite's decision, its ``max`` margin."""
    return detector.verdict_from_table(labels, margins).rejected, margins.amax(0)


@torch.no_grad()
def layer_margins(detector, x: torch.Tensor, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels [N], margins [L, N])``: every layer's margin on every image (``> 1``: that layer rejects)."""
    parts = [detector.layer_table(xb) for xb in x.split(batch)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1)


def last_layer_cut(clean_margins: torch.Tensor, rate: float) -> float:
    """The cut on the last layer's margin at which the composite rejects ``rate`` of the clean images
    (``clean_margins [L, M]``): the sweep's rule (:func:`mixdefense.calibration.margin_cutoffs`, the earlier
    layers keeping their cut at 1).  ``inf`` when the earlier layers alone already reject ``rate`` or more."""
    prior = (clean_margins[:-1] > 1).any(0)
    if prior.double().mean() >= rate:
        return float("inf")
    return float(margin_cutoffs(clean_margins.T.float(), rate, fixed=clean_margins.shape[0] - 1)[-1])


def summarise(points: list[dict]) -> dict:
    """Mean and minimum Acc_detector and detection over the points with successful AEs."""
    ok = [p for p in points if p["num_successful"]]
    worst = min(ok, key=lambda p: p["acc_detector"])
    return {"points": len(ok), "mean_acc_detector": sum(p["acc_detector"] for p in ok) / len(ok),
            "min_acc_detector": worst["acc_detector"], "min_point": f"{worst['attack']} {worst['eps']:.4g}",
            "mean_detection_rate": sum(p["detection_rate"] for p in ok) / len(ok),
            "mean_auroc": sum(p["auroc"] for p in ok) / len(ok)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("mnist", "cifar10", "gtsrb"), required=True)
    ap.add_argument("--bundles", nargs="+", required=True, help="detector bundles sharing one classifier")
    ap.add_argument("--names", nargs="+", default=None, help="a short name per bundle (default: the file stems)")
    ap.add_argument("--n-clean", type=int, default=2000)
    ap.add_argument("--n-attacked", type=int, default=300)
    ap.add_argument("--name", default="")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ae-cache", default=None, help="file that keeps the AEs for a later run on the same images")
    args = ap.parse_args(argv)
    names = args.names or [Path(b).stem for b in args.bundles]
    if len(names) != len(args.bundles) or len(set(names)) != len(names):
        raise SystemExit("--names: one distinct name per bundle")
    detectors = {n: load_detector(b) for n, b in zip(names, args.bundles)}
    classifier = next(iter(detectors.values())).classifier
    for n, d in detectors.items():
        if any(not torch.equal(a, b) for a, b in zip(d.classifier.state_dict().values(), classifier.state_dict().values())):
            raise SystemExit(f"bundle {n!r} has another classifier: the AEs would not be the same attack on every bundle")
    t0 = time.time()
    x, y = load_images(args.dataset, "selection", args.n_clean)
    with torch.no_grad():
        correct = torch.cat([classifier(b).argmax(1) for b in x.split(250)]) == y
    clean_tables = {n: layer_margins(d, x[correct]) for n, d in detectors.items()}  # every bundle scores them once
    clean = {n: (labels, *verdict(detectors[n], labels, m)) for n, (labels, m) in clean_tables.items()}
    clean_margins = {n: m for n, (_, m) in clean_tables.items()}
    cuts = {n: {f"{r:g}": last_layer_cut(m, r) for r in EQUAL_RATES} for n, m in clean_margins.items()}
    report = {"dataset": args.dataset, "split": "selection", "threat_model": "oblivious (AEs against the bare classifier)",
              "bundles": dict(zip(names, args.bundles)), "clean_images": len(y), "clean_correct": int(correct.sum()),
              "clean": {}, "points": {n: [] for n in names}}
    for n, (_, rej, _) in clean.items():
        k, m = int(rej.sum()), int(rej.numel())
        report["clean"][n] = {"false_rejection": k / m, "ci95": list(wilson_interval(k, m)),
                              "clean_accuracy_with_defense": float(((~rej).sum()) / len(y))}
    idx = correct.nonzero().flatten()[: args.n_attacked]
    xa, ya = x[idx], y[idx]
    report["attacked_images"] = len(ya)
    cache = Path(args.ae_cache) if args.ae_cache else None
    stored = torch.load(cache) if cache and cache.is_file() else {}
    if stored and not torch.equal(stored.get("x"), xa):
        raise SystemExit(f"{cache}: its AEs come from other images; delete it or name another --ae-cache")
    for attack, budgets in POINTS.items():
        if attack in stored:
            advs = [[a] for a in stored[attack]]
        else:
            torch.manual_seed(0)
            advs = [[] for _ in budgets]
            for xb, yb in zip(xa.split(150), ya.split(150)):
                for i, adv in enumerate(run_sweep(attack, classifier, xb, yb, budgets)):
                    advs[i].append(adv)
            stored[attack] = [torch.cat(a) for a in advs]
            if cache:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"x": xa, **stored}, cache)
        for eps, adv in zip(budgets, advs):
            x_adv = torch.cat(adv)
            norm = ((x_adv - xa).flatten(1).norm(dim=1) if attack == "pgd_l2" else (x_adv - xa).flatten(1).abs().amax(1))
            fooled = torch.cat([classifier(b).argmax(1) for b in x_adv.split(250)]) != ya
            for n, d in detectors.items():
                labels, margins = layer_margins(d, x_adv)
                rejected, score = verdict(d, labels, margins)
                _, c_rej, c_score = clean[n]
                r = point_metrics(fooled, ~fooled, norm, rejected, score, c_rej, c_score)
                for rate, cut in cuts[n].items():  # the same bundle, its last layer re-cut on the selection images
                    prior, cm = (margins[:-1] > 1).any(0), clean_margins[n]
                    c_prior = (cm[:-1] > 1).any(0)
                    r_eq = point_metrics(fooled, ~fooled, norm, prior | (margins[-1] > cut), score,
                                         c_prior | (cm[-1] > cut), c_score)
                    r[f"at_selection_{rate}"] = {k: r_eq[k] for k in ("detection_rate", "acc_detector", "clean_rejection_rate")}
                report["points"][n].append({"attack": attack, "eps": eps, **r})
        print(f"  {attack}: {len(budgets)} budgets ({time.time() - t0:.0f} s)", flush=True)
    report["summary"] = {n: {**summarise(p), **report["clean"][n]} for n, p in report["points"].items()}
    for n, pts in report["points"].items():
        ok = [p for p in pts if p["num_successful"]]
        for rate in cuts[n]:
            key = f"at_selection_{rate}"
            report["summary"][n][key] = {
                "clean_rejection": ok[0][key]["clean_rejection_rate"] if ok else None,
                "mean_acc_detector": sum(p[key]["acc_detector"] for p in ok) / len(ok),
                "min_acc_detector": min(p[key]["acc_detector"] for p in ok),
                "mean_detection_rate": sum(p[key]["detection_rate"] for p in ok) / len(ok)}
    report["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"operating_points_{args.dataset}{'_' + args.name if args.name else ''}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("| bundle | clean rejected (selection) | mean Acc_detector | min Acc_detector (point) | mean detection | mean AUROC |")
    print("|---|---|---|---|---|---|")
    for n, s in report["summary"].items():
        print(f"| {n} | {100 * s['false_rejection']:.2f} % [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}] | "
              f"{100 * s['mean_acc_detector']:.1f} % | {100 * s['min_acc_detector']:.1f} % ({s['min_point']}) | "
              f"{100 * s['mean_detection_rate']:.1f} % | {s['mean_auroc']:.3f} |")
    print("\nEach bundle with its last layer re-cut so that it rejects 1 % / 2 % of the correctly classified selection"
          " images (an ROC reading at equal clean cost, set on the selection split: not a calibration):")
    print("| bundle | rate | clean rejected | mean Acc_detector | min Acc_detector | mean detection |\n|---|---|---|---|---|---|")
    for n, s in report["summary"].items():
        for rate in EQUAL_RATES:
            e = s[f"at_selection_{rate:g}"]
            print(f"| {n} | {100 * rate:g} % | {100 * e['clean_rejection']:.2f} % | {100 * e['mean_acc_detector']:.1f} % | "
                  f"{100 * e['min_acc_detector']:.1f} % | {100 * e['mean_detection_rate']:.1f} % |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise an evaluation run (``results/<ds>/<run>/evaluation.json``) for the README and closing notes.

Prints, per operating point (``--frr``: one of the run's rates, default all) and for the composite (or
``--defense``): clean accuracy without and with the defense, the clean false rejection with its 95 %
interval and the misclassified images it rejects; the minimum / mean Acc_detector and Acc_RC per attack
over every budget point (sparse ones included, marked), and every point whose Acc_detector is below
``--floor`` (default 0.90, the paper's "flat curve" claim) with its interval.

    python benchmarks/evaluation_summary.py results/mnist/compare/evaluation.json
"""

from __future__ import annotations

import argparse
import json


def _eps(r: dict) -> str:
    eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
    return ("≤" if r.get("minimum_norm") else "") + eps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluation", help="an evaluation.json written by `mixdefense test --config experiments/<ds>/evaluate.yaml`")
    ap.add_argument("--defense", default="mixdefense")
    ap.add_argument("--frr", type=float, default=None, help="one operating point (default: every one of the run)")
    ap.add_argument("--floor", type=float, default=0.90)
    args = ap.parse_args()
    result = json.load(open(args.evaluation))
    c = result["clean"]
    frrs = [f for f in result["operating_points"] if args.frr is None or f == args.frr]
    for frr in frrs:
        op = c["operating_points"][str(frr)][args.defense]
        print(f"== {args.defense} at {100 * frr:g} % clean false rejection (thresholds on correctly classified calibration images) ==")
        print(f"clean ({c['images']} test images): accuracy {100 * c['accuracy_classifier']:.2f} % without the defense, "
              f"{100 * op['accuracy']:.2f} % with it; false rejection {100 * op['false_rejection']:.2f} % "
              f"({100 * op['false_rejection_ci_low']:.2f}–{100 * op['false_rejection_ci_high']:.2f}) of "
              f"{op['correctly_classified']} correctly classified; rejected {op['misclassified_rejected']} of "
              f"{op['misclassified']} misclassified")
        pts = [r for r in result["points"] if r["defense"] == args.defense and r["frr_target"] == frr
               and r["acc_detector"] == r["acc_detector"]]
        sparse = sum(not r["kept"] for r in pts)
        det, rc = [r["acc_detector"] for r in pts], [r["acc_rc"] for r in pts]
        if not pts:
            print("no point with a successful AE")
            continue
        print(f"{len(pts)} points ({sparse} sparse: < {result['min_successes']} successful AEs, kept in every figure); "
              f"Acc_detector min {100 * min(det):.1f} % / mean {100 * sum(det) / len(det):.1f} %; "
              f"Acc_RC min {100 * min(rc):.1f} % / mean {100 * sum(rc) / len(rc):.1f} %")
        print("| attack | points | ε range | Acc_detector min / mean | Acc_RC min / mean | detection min |")
        print("|---|---|---|---|---|---|")
        for attack, norm in dict.fromkeys((r["attack"], r["norm"]) for r in pts):
            sel = [r for r in pts if (r["attack"], r["norm"]) == (attack, norm)]
            d, a = [r["acc_detector"] for r in sel], [r["acc_rc"] for r in sel]
            print(f"| {attack} ({norm}) | {len(sel)} | {_eps(sel[0])}–{_eps(sel[-1])} | {100 * min(d):.1f} / {100 * sum(d) / len(d):.1f} % | "
                  f"{100 * min(a):.1f} / {100 * sum(a) / len(a):.1f} % | {100 * min(r['detection_rate'] for r in sel):.1f} % |")
        for r in pts:
            if r["acc_detector"] < args.floor:
                print(f"  below {100 * args.floor:.0f} %: {r['attack']} ({r['norm']}) ε {_eps(r)}: Acc_detector "
                      f"{100 * r['acc_detector']:.1f} % ({100 * r['acc_detector_ci_low']:.1f}–{100 * r['acc_detector_ci_high']:.1f}), "
                      f"detection {100 * r['detection_rate']:.1f} % of {r['num_successful']} successful AEs"
                      + ("" if r["kept"] else " (sparse)"))
        print()


if __name__ == "__main__":
    main()

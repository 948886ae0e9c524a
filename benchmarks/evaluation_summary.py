"""Summarise an evaluation run (``results/<ds>/<run>/evaluation.json``) for the README and closing notes.

Prints, for the composite (or ``--defense``): clean accuracy with and without the defense, the number
of kept budget points, the minimum / mean Acc_detector and Acc_RC over them, and every kept point
below ``--floor`` (default 0.90, the paper's "flat curve" claim).

    python benchmarks/evaluation_summary.py results/mnist/mixdefense/evaluation.json
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("evaluation", help="an evaluation.json written by `mixdefense test --config experiments/<ds>/evaluate.yaml`")
    ap.add_argument("--defense", default="mixdefense")
    ap.add_argument("--floor", type=float, default=0.90)
    args = ap.parse_args()
    result = json.load(open(args.evaluation))
    c = result["clean"]
    print(f"clean accuracy: {100 * c['accuracy_classifier']:.2f} % without the defense, "
          f"{100 * c['accuracy_with_defense']:.2f} % with it ({c['images']} test images); false rejection "
          + ", ".join(f"{k} {100 * v:.2f} %" for k, v in c["false_rejection"].items()))
    kept = [r for r in result["points"] if r["defense"] == args.defense and r["kept"]]
    dropped = [r for r in result["points"] if r["defense"] == args.defense and not r["kept"]]
    if not kept:
        print("no kept points")
        return
    det, rc = [r["acc_detector"] for r in kept], [r["acc_rc"] for r in kept]
    print(f"{args.defense}: {len(kept)} kept points ({len(dropped)} dropped, < {result['min_successes']} successful AEs); "
          f"Acc_detector min {100 * min(det):.1f} % / mean {100 * sum(det) / len(det):.1f} %; "
          f"Acc_RC min {100 * min(rc):.1f} % / mean {100 * sum(rc) / len(rc):.1f} %")
    print("| attack | kept budgets | ε range | Acc_detector min / mean | Acc_RC min / mean | caught by (mean) |")
    print("|---|---|---|---|---|---|")
    for attack, norm in dict.fromkeys((r["attack"], r["norm"]) for r in result["points"] if r["defense"] == args.defense):
        pts = [r for r in kept if (r["attack"], r["norm"]) == (attack, norm)]
        if not pts:
            print(f"| {attack} ({norm}) | 0 | — | — | — | — |")
            continue
        eps = [r["eps"] * 255 if norm == "linf" else r["eps"] for r in pts]
        unit = "/255" if norm == "linf" else " (L2)"
        d, c = [r["acc_detector"] for r in pts], [r["acc_rc"] for r in pts]
        caught = ", ".join(f"{k[len('caught_by_'):]} {100 * sum(r[k] for r in pts) / len(pts):.0f} %"
                           for k in pts[0] if k.startswith("caught_by_"))
        print(f"| {attack} ({norm}) | {len(pts)} | {min(eps):g}–{max(eps):g}{unit} | {100 * min(d):.1f} / {100 * sum(d) / len(d):.1f} % | "
              f"{100 * min(c):.1f} / {100 * sum(c) / len(c):.1f} % | {caught} |")
    for r in kept:
        if r["acc_detector"] < args.floor:
            eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
            print(f"  below {100 * args.floor:.0f} %: {r['attack']} ({r['norm']}) ε {'≤' if r.get('minimum_norm', r.get('binned')) else ''}{eps}: "
                  f"Acc_detector {100 * r['acc_detector']:.1f} %, detection {100 * r['detection_rate']:.1f} %, "
                  f"clean rejection of the originals {100 * r['clean_rejection_rate']:.1f} % ({r['num_successful']} AEs)")


if __name__ == "__main__":
    main()

"""Gradient-free attacks validated on the bare classifier (oblivious setting), against references.

On the first ``--images`` test images the shipped classifier gets right:

* Square L∞ at every ``--eps-linf`` (and L2 at every ``--eps-l2``) with ``--queries`` queries per image —
  ours (:func:`mixdefense.attacks.gradient_free.square_attack` on the margin loss) vs
  ``torchattacks.Square`` with the same budget, ``p_init`` and loss (margin), one restart.
  torchattacks counts the initialisation apart: it may use ``--queries + 1`` queries per image;
* HopSkipJump L2 (``--hsj-queries`` per image, started from the nearest other test image the
  classifier labels differently) — median final L2 against C&W's (the registry's ``cw``, a
  white-box minimum-norm attack: the decision-based attack should land in its range); and
  HopSkipJump L∞ with the same budget; both read their success at the Square budgets off their norms.

    python benchmarks/gradient_free_check.py --dataset mnist --images 50 --queries 1000 --hsj-queries 5000

Writes ``benchmarks/results/gradient_free_check_<dataset>.{json,md}``.  One thread by default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from attack_strength import timed  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from mixdefense.attacks import perturbation_norm, run_attack
from mixdefense.attacks.gradient_free import ClassifierQueries, hop_skip_jump, square_attack
from mixdefense.classifiers import load_classifier
from mixdefense.cli import load_images
from mixdefense.metrics import wilson_interval


def row(success: torch.Tensor, norms: torch.Tensor, seconds: float, queries: torch.Tensor | None = None, **extra) -> dict:
    """Success rate (95 % Wilson interval), median norm of the successful AEs, median queries of the successes."""
    k, n = int(success.sum()), len(success)
    out = {"success": k / n, "success_ci95": wilson_interval(k, n),
           "median_norm": float(norms[success].median()) if k else math.nan,
           "max_norm": float(norms[success].max()) if k else math.nan, "seconds": round(seconds, 1)}
    if queries is not None:
        out["median_queries_of_successes"] = float(queries[success].float().median()) if k else math.nan
        out["mean_queries"] = float(queries.float().mean())
    return {**out, **extra}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--queries", type=int, default=1000, help="Square: queries per image")
    ap.add_argument("--eps-linf", type=float, nargs="+", default=[0.3, 0.1], help="Square L∞ budgets")
    ap.add_argument("--eps-l2", type=float, nargs="+", default=[2.0], help="Square L2 budgets")
    ap.add_argument("--p-init", type=float, default=0.8)
    ap.add_argument("--hsj-queries", type=int, default=5000, help="HopSkipJump: queries per image")
    ap.add_argument("--pool", type=int, default=500, help="test images after the attacked ones, HopSkipJump's starts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    import torchattacks

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model = load_classifier(f"artifacts/{args.dataset}/classifier.pt").eval().requires_grad_(False)
    x_all, y_all = load_images(args.dataset, "test", 2 * args.images + args.pool)
    ok = (model(x_all[: 2 * args.images]).argmax(1) == y_all[: 2 * args.images]).nonzero().squeeze(1)[: args.images]
    x, y = x_all[ok], y_all[ok]
    pool = x_all[2 * args.images:]
    q = ClassifierQueries(model, y)
    gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
    rows = {}

    budgets = [("linf", e, "Linf") for e in args.eps_linf] + [("l2", e, "L2") for e in args.eps_l2]
    for norm, eps, ta_norm in budgets:
        res, s = timed(lambda: square_attack(q.score, x, norm=norm, eps=eps, n_queries=args.queries, p_init=args.p_init,
                                             generator=gen(), progress=False))
        ours_ok = model(res.x_adv).argmax(1) != y
        rows[f"square {norm} ε={eps:g} / ours"] = row(ours_ok, res.norms, s, res.queries,
                                                      agrees_with_its_success_flag=bool((ours_ok == res.success).all()))
        ta = torchattacks.Square(model, norm=ta_norm, eps=eps, n_queries=args.queries, n_restarts=1, p_init=args.p_init,
                                 loss="margin", seed=args.seed)
        adv, s = timed(lambda: ta(x, y))
        rows[f"square {norm} ε={eps:g} / torchattacks"] = row(model(adv).argmax(1) != y, perturbation_norm(adv, x, norm), s)

    adv, s = timed(lambda: run_attack("cw", model, x, y))
    rows["cw l2 (white-box reference) / ours"] = row(model(adv).argmax(1) != y, perturbation_norm(adv, x, "l2"), s)
    for norm in ("l2", "linf"):
        res, s = timed(lambda: hop_skip_jump(q.is_adversarial, x, pool, norm=norm, max_queries=args.hsj_queries,
                                             generator=gen(), progress=False))
        adv_ok = model(res.x_adv).argmax(1) != y
        extra = {"iterations": res.info["iterations_run"], "median_start_norm": float(res.trace[:, 0][res.success].median()),
                 "agrees_with_its_success_flag": bool((adv_ok == res.success).all())}
        for e in args.eps_linf if norm == "linf" else args.eps_l2:
            extra[f"broken_at_eps_{e:g}"] = float((res.success & (res.norms <= e)).float().mean())
        rows[f"hopskipjump {norm} / ours"] = row(adv_ok, res.norms, s, res.queries, **extra)

    wall, cpu = round(time.perf_counter() - wall0, 1), round(time.process_time() - cpu0, 1)
    cmd = (f"OMP_NUM_THREADS={args.threads} python benchmarks/gradient_free_check.py --dataset {args.dataset} --images "
           f"{args.images} --queries {args.queries} --hsj-queries {args.hsj_queries} --eps-linf "
           + " ".join(f"{e:g}" for e in args.eps_linf) + " --eps-l2 " + " ".join(f"{e:g}" for e in args.eps_l2)
           + f" --pool {args.pool}")
    report = {"dataset": args.dataset, "images": len(y), "threat_model": "oblivious (the bare classifier)", "command": cmd,
              "settings": vars(args), "threads": torch.get_num_threads(), "wall_seconds": wall, "cpu_seconds": cpu,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gradient_free_check_{args.dataset}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Gradient-free attacks on {args.dataset} ({len(y)} correctly classified test images; oblivious: the bare classifier)",
             "", f"`{cmd}` — {wall} s wall, {cpu} s CPU on {torch.get_num_threads()} thread(s) (row seconds: wall)", "",
             "| attack / implementation | success (95 % CI) | median norm of successful AEs | median queries of successes | seconds |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lo, hi = r["success_ci95"]
        mq = r.get("median_queries_of_successes")
        lines.append(f"| {name} | {100 * r['success']:.1f} % ({100 * lo:.1f}–{100 * hi:.1f}) | {r['median_norm']:.4g} | "
                     f"{'' if mq is None else f'{mq:g}'} | {r['seconds']} |")
    lines.append("")
    for norm, budgets_n in (("l2", args.eps_l2), ("linf", args.eps_linf)):
        r = rows[f"hopskipjump {norm} / ours"]
        broken = ", ".join(f"ε = {e:g}: {100 * r[f'broken_at_eps_{e:g}']:.1f} %" for e in budgets_n)
        lines.append(f"HopSkipJump {norm}: broken at {broken} (the minimum-norm rule); median start norm "
                     f"{r['median_start_norm']:.3g}, {r['iterations']} iterations.  ")
    (out / f"gradient_free_check_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

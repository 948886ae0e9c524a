"""Attack strength: the registry's attacks against an independent implementation (Foolbox 3) at equal settings.

On the first ``--images`` test images the shipped classifier gets right (oblivious setting: the bare
classifier is attacked), per attack: success rate (a 95 % Wilson interval beside it) and median
perturbation norm of the successful AEs, for this project's implementation and for Foolbox's:

* C&W L2 — ours (:class:`mixdefense.attacks.CarliniWagnerL2`, the registry's defaults: 9 binary-search
  steps × 120 Adam iterations, lr 0.1, c₀ = 0.1, per-image early abort) vs
  ``foolbox.attacks.L2CarliniWagnerAttack`` with the same settings and no early abort (its own early
  abort stops the whole batch).  Foolbox returns an all-zero image where it finds nothing; such an
  image counts as a failure here (it is not an AE of the attack);
* DeepFool L2 — ours (batched, 100 steps, overshoot 0.02) vs ``foolbox.attacks.L2DeepFoolAttack``
  (100 steps, overshoot 0.02, every class a candidate);
* PGD L∞ at the given budgets — ours (50 steps of 2.5·ε/50, random start) vs ``foolbox.attacks.LinfPGD``
  (same steps and step size, random start), and APGD-CE / APGD-DLR (torchattacks) beside them.

    pip install foolbox==3.3.4      # the independent implementation (not a dependency of the package)
    python benchmarks/attack_strength.py --dataset mnist --images 200 --eps 0.1 0.3

Writes ``benchmarks/results/attack_strength_<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from mixdefense.attacks import perturbation_norm, run_attack
from mixdefense.classifiers import load_classifier
from mixdefense.cli import load_images
from mixdefense.metrics import wilson_interval


def summary(model, x, y, x_adv, norm: str, seconds: float, invalid: torch.Tensor | None = None) -> dict:
    success = model(x_adv).argmax(1) != y
    if invalid is not None:
        success &= ~invalid
    k, n = int(success.sum()), len(y)
    norms = perturbation_norm(x_adv, x, norm)[success]
    return {"success": k / n, "success_ci95": wilson_interval(k, n), "median_norm": float(norms.median()) if k else math.nan,
            "seconds": round(seconds, 1)}


def _family(row: str) -> str:
    """``"cw / ours"`` → cw, ``"apgd_ce 8/255 / ours"`` → pgd: which ``--only`` choice made a row."""
    first = row.split()[0]
    return "pgd" if "pgd" in first else first


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--eps", type=float, nargs="+", default=[8 / 255], help="PGD/APGD L∞ budgets, [0, 1] pixel units")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="+", choices=["cw", "deepfool", "pgd"], default=["cw", "deepfool", "pgd"],
                    help="run these attacks only; the other rows are kept from the existing report, which must be "
                         "of the same images (checked by their digest)")
    args = ap.parse_args(argv)
    import foolbox as fb

    torch.manual_seed(0)
    model = load_classifier(f"artifacts/{args.dataset}/classifier.pt").eval().requires_grad_(False)
    x, y = load_images(args.dataset, "test", args.images * 2)
    ok = model(x).argmax(1) == y
    x, y = x[ok][: args.images], y[ok][: args.images]
    fmodel = fb.PyTorchModel(model, bounds=(0, 1))
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    out = Path(args.out)
    path = out / f"attack_strength_{args.dataset}.json"
    rows = {}
    if set(args.only) != {"cw", "deepfool", "pgd"}:
        old = json.loads(path.read_text()) if path.exists() else {}
        if old.get("images_sha256") != digest:
            raise SystemExit(f"{path} is not of these images (or has no digest): run all attacks once (no --only)")
        rows = {k: v for k, v in old["rows"].items() if _family(k) not in args.only}

    if "cw" in args.only:
        adv, s = timed(lambda: run_attack("cw", model, x, y))
        rows["cw / ours"] = summary(model, x, y, adv, "l2", s)
        cw = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=120, stepsize=0.1, confidence=0,
                                              initial_const=0.1, abort_early=False)
        (_, adv, _), s = timed(lambda: cw(fmodel, x, y, epsilons=None))
        rows["cw / foolbox"] = summary(model, x, y, adv, "l2", s, invalid=adv.flatten(1).abs().amax(1) == 0)

    if "deepfool" in args.only:
        adv, s = timed(lambda: run_attack("deepfool", model, x, y))
        rows["deepfool / ours"] = summary(model, x, y, adv, "l2", s)
        df = fb.attacks.L2DeepFoolAttack(steps=100, overshoot=0.02, candidates=None)
        (_, adv, _), s = timed(lambda: df(fmodel, x, y, epsilons=None))
        rows["deepfool / foolbox"] = summary(model, x, y, adv, "l2", s)

    for eps in args.eps if "pgd" in args.only else ():
        tag = f"{eps * 255:.0f}/255" if abs(eps * 255 - round(eps * 255)) < 1e-3 else f"ε = {eps:g}"
        adv, s = timed(lambda: run_attack("pgd_linf", model, x, y, eps))
        rows[f"pgd_linf {tag} / ours"] = summary(model, x, y, adv, "linf", s)
        pgd = fb.attacks.LinfPGD(steps=50, rel_stepsize=2.5 / 50, random_start=True)
        (_, adv, _), s = timed(lambda: pgd(fmodel, x, y, epsilons=eps))
        rows[f"pgd_linf {tag} / foolbox"] = summary(model, x, y, adv, "linf", s)
        for name in ("apgd_ce", "apgd_dlr"):
            adv, s = timed(lambda: run_attack(name, model, x, y, eps))
            rows[f"{name} {tag} / ours (torchattacks)"] = summary(model, x, y, adv, "linf", s)

    order = ["cw", "deepfool", "pgd", "apgd"]
    rows = dict(sorted(rows.items(), key=lambda kv: next(i for i, o in enumerate(order) if kv[0].startswith(o))))
    report = {"dataset": args.dataset, "images": len(y), "split": "test (the protocol's test split)",
              "images_sha256": digest, "threads": torch.get_num_threads(),
              "threat_model": "oblivious (the bare classifier)", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Attack strength on {args.dataset} ({len(y)} correctly classified test images; oblivious: the bare classifier)",
             "", "`python benchmarks/attack_strength.py --dataset " + args.dataset + f" --images {args.images} --eps "
             + " ".join(f"{e:g}" for e in args.eps) + "`", "",
             "| attack / implementation | success (95 % CI) | median norm of successful AEs | seconds |", "|---|---|---|---|"]
    for name, r in rows.items():
        lo, hi = r["success_ci95"]
        lines.append(f"| {name} | {100 * r['success']:.1f} % ({100 * lo:.1f}–{100 * hi:.1f}) | {r['median_norm']:.4g} | {r['seconds']} |")
    (out / f"attack_strength_{args.dataset}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

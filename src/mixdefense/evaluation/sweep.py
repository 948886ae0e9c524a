"""The bundle sweep's results: rows → metrics per (attack, ε, defense), tables, files and figures.

:func:`summarize` turns the rows the evaluation loop gathers (``lightning_modules.evaluation``)
into one record per (point, defense) with :func:`point_row`; :func:`format_table`,
:func:`comparison_table` and :func:`write_report` present them (``evaluation.json``,
``points.csv``, Figure-5/6-style PNGs, ``comparison.md``).  Plain PyTorch: no Lightning.

Row layouts (float tensors): AE rows ``[point, success, adv_correct, norm, adv margins (L),
clean margins (L)]``; clean rows ``[correct, margins (L)]``; baseline rows ``[point, baseline,
success, adv_correct, norm, adv margin, clean margin]``; baseline clean rows ``[baseline,
correct, margin]``.  Margins ``> 1`` mean rejected.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from mixdefense.evaluation.plots import budget_curves
from mixdefense.evaluation.points import point_metrics
from mixdefense.io import atomic_write_text

COMPOSITE = "mixdefense"
UNDEFENDED = "undefended"
BASELINE_WIDTH = 7  # [point, baseline, success, adv_correct, norm, adv margin, clean margin]
#: every AE of the sweep is made against the bare classifier (Madry's model: against itself)
THREAT_MODEL = "oblivious attacker: AEs made against the bare classifier"


def baseline_table(point, b, success, correct, norm, adv_margin, clean_margin) -> torch.Tensor:
    """Rows ``[n, BASELINE_WIDTH]`` of one compared defense on ``n`` AEs."""
    return torch.stack([point, torch.full_like(point, float(b)), success, correct, norm,
                        adv_margin.float(), clean_margin.float()], 1)


def point_row(p: dict, defense: str, success, correct_adv, norm, adv_score, clean_score, min_successes: int,
              kept_by_aes: bool = False) -> dict:
    """One defense at one point: the point, the defense and every metric of
    :func:`mixdefense.evaluation.points.point_metrics`; scores are margins (``> 1``: rejected).
    A point is kept when it has ``min_successes`` successful AEs (``kept_by_aes``: AEs)."""
    m = point_metrics(success, correct_adv, norm, adv_score > 1, clean_score > 1, adv_score, clean_score)
    return {"attack": p["attack"], "norm": p["norm"], "eps": p["eps"], "minimum_norm": p["minimum_norm"], "defense": defense,
            **m, "kept": (m["num_aes"] if kept_by_aes else m["num_successful"]) >= min_successes}


def summarize(ae: torch.Tensor, clean: torch.Tensor, points: list[dict], layer_names: list[str],
              min_successes: int, baselines: list[str] | None = None, baseline_rows: torch.Tensor | None = None,
              baseline_clean: torch.Tensor | None = None, robust: Sequence[str] = ()) -> dict:
    """Every metric from the gathered rows (see :class:`MixDefenseEvaluation`).

    Defenses: each bundle layer alone, the composite (``mixdefense``), the undefended classifier
    (never rejects; Acc_RC = share of AEs still classified right) and each baseline (``robust``:
    the names of robust classifiers, attacked on their own).  A robust classifier's points are
    kept when it was attacked on ≥ ``min_successes`` images (its successes are few by design);
    every other point needs ``min_successes`` successful AEs.
    """
    baselines = baselines or []
    n_layers = len(layer_names)
    defenses = {name: [i] for i, name in enumerate(layer_names)}
    defenses[COMPOSITE] = list(range(n_layers))
    correct, clean_m = clean[:, 0].bool(), clean[:, 1:]
    clean_summary = {"images": int(len(clean)), "accuracy_classifier": float(correct.float().mean()) if len(clean) else math.nan}
    rejected_all = (clean_m > 1).any(1)
    clean_summary["accuracy_with_defense"] = float((correct & ~rejected_all).float().mean()) if len(clean) else math.nan
    clean_summary["false_rejection"] = {d: float((clean_m[:, idx] > 1).any(1).float().mean()) if len(clean) else math.nan
                                        for d, idx in defenses.items()}
    bc = baseline_clean if baseline_clean is not None else torch.empty(0, 3)
    bl = baseline_rows if baseline_rows is not None else torch.empty(0, BASELINE_WIDTH)
    clean_summary["baselines"] = {}
    for b, name in enumerate(baselines):
        sel = bc[bc[:, 0] == b]
        ok, rej = sel[:, 1].bool(), sel[:, 2] > 1
        clean_summary["baselines"][name] = {
            "images": len(sel), "accuracy": float((ok & ~rej).float().mean()) if len(sel) else math.nan,
            "false_rejection": float(rej.float().mean()) if len(sel) else math.nan}
    rows = []
    for pid, p in enumerate(points):
        sel = ae[ae[:, 0] == pid] if len(ae) else ae
        success, correct_adv, norm = sel[:, 1].bool(), sel[:, 2].bool(), sel[:, 3]
        adv_m, cl_m = sel[:, 4:4 + n_layers], sel[:, 4 + n_layers:]
        for d, idx in defenses.items():
            r = point_row(p, d, success, correct_adv, norm, adv_m[:, idx].amax(1), cl_m[:, idx].amax(1), min_successes)
            if d == COMPOSITE and r["num_successful"]:
                s = success
                first = torch.where((adv_m[s] > 1).any(1), (adv_m[s] > 1).int().argmax(1), torch.full((int(s.sum()),), -1))
                for i, name in enumerate(layer_names):
                    r[f"caught_by_{name}"] = float((first == i).float().mean())
            rows.append(r)
        never = torch.zeros(len(sel))
        rows.append(point_row(p, UNDEFENDED, success, correct_adv, norm, never, never, min_successes))
        for b, name in enumerate(baselines):
            bs = bl[(bl[:, 0] == pid) & (bl[:, 1] == b)] if len(bl) else bl
            rows.append(point_row(p, name, bs[:, 2].bool(), bs[:, 3].bool(), bs[:, 4], bs[:, 5], bs[:, 6], min_successes,
                                   kept_by_aes=name in robust))
    return {"clean": clean_summary, "layers": layer_names, "baselines": baselines, "robust": list(robust),
            "min_successes": min_successes, "points": rows}


def format_table(result: dict) -> str:
    """The composite's points as a text table (attack, ε, attack success, Acc_detector, Acc_RC, catches)."""
    c = result["clean"]
    fr = ", ".join(f"{k} {100 * v:.1f} %" for k, v in c["false_rejection"].items())
    lines = [f"clean ({c['images']} test images): accuracy {100 * c['accuracy_classifier']:.1f} % without the defense, "
             f"{100 * c['accuracy_with_defense']:.1f} % with it (rejections count as errors); false rejection: {fr}",
             f"threat model: {THREAT_MODEL}; minimum-norm attacks (≤ε) count an image at ε iff its AE has norm ≤ ε",
             "", f"{'attack':<16} {'eps':>9} {'AEs':>5} {'success':>8} {'Acc_det':>8} {'95 % CI':>11} {'Acc_RC':>7} "
             f"{'AUROC':>6}  caught by",]
    for r in result["points"]:
        if r["defense"] != COMPOSITE:
            continue
        eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
        if r["minimum_norm"]:
            eps = "≤" + eps
        caught = ", ".join(f"{k[len('caught_by_'):]} {100 * v:.0f} %" for k, v in r.items() if k.startswith("caught_by_"))
        flag = "" if r["kept"] else f"  (sparse: {r['num_successful']} successful AEs < {result['min_successes']})"
        pct = lambda v: "   —" if v != v else f"{100 * v:.1f}"  # noqa: E731
        auroc = "  —" if r["auroc"] != r["auroc"] else f"{r['auroc']:.3f}"
        name = f"{r['attack']} ({r['norm']})" if r["minimum_norm"] else r["attack"]
        ci = "—" if r["acc_detector"] != r["acc_detector"] else \
            f"{100 * r['acc_detector_ci_low']:.1f}–{100 * r['acc_detector_ci_high']:.1f}"
        lines.append(f"{name:<16} {eps:>9} {r['num_aes']:>5} {pct(r['attack_success_rate']):>8} "
                     f"{pct(r['acc_detector']):>8} {ci:>11} {pct(r['acc_rc']):>7} {auroc:>6}  {caught}{flag}")
    return "\n".join(lines)


def comparison_table(result: dict) -> str:
    """Markdown: mean Acc_detector and Acc_RC per attack and compared defense, on common budgets.

    Compared defenses: the composite, the detector baselines, the robust classifiers and the
    undefended classifier.  Means run over the budget points the composite keeps (≥
    ``min_successes`` successful AEs against the undefended classifier) that the defense keeps too
    (``n`` = how many), so every column averages the same budgets.  Robust classifiers and the
    undefended classifier never reject: their Acc_detector is not defined ("—")."""
    never_reject = {*result.get("robust", []), UNDEFENDED}
    names = [COMPOSITE, *result.get("baselines", []), UNDEFENDED]
    common = {(r["attack"], r["norm"], r["eps"]) for r in result["points"] if r["defense"] == COMPOSITE and r["kept"]}
    attacks = list(dict.fromkeys((r["attack"], r["norm"], r["minimum_norm"]) for r in result["points"]))
    head = "| attack | " + " | ".join(f"{n} Acc_det / Acc_RC" for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 1)]
    fmt = lambda v: f"{100 * sum(v) / len(v):.1f}" if v else "—"  # noqa: E731
    for attack, norm, minimum_norm in attacks:
        cells = []
        for n in names:
            pts = [r for r in result["points"] if (r["attack"], r["norm"], r["minimum_norm"], r["defense"]) == (attack, norm, minimum_norm, n)
                   and r["kept"] and (r["attack"], r["norm"], r["eps"]) in common]
            det = [] if n in never_reject else [r["acc_detector"] for r in pts if r["acc_detector"] == r["acc_detector"]]
            rc = [r["acc_rc"] for r in pts if r["acc_rc"] == r["acc_rc"]]
            cells.append(f"{fmt(det)} / {fmt(rc)} (n={len(pts)})")
        label = f"{attack} ({norm}, minimum-norm)" if minimum_norm else attack
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    c = result["clean"]
    acc = {COMPOSITE: c["accuracy_with_defense"], UNDEFENDED: c["accuracy_classifier"],
           **{n: v["accuracy"] for n, v in c.get("baselines", {}).items()}}
    lines.append("| clean accuracy (rejections count as errors) | " + " | ".join(
        f"{100 * acc[n]:.2f} %" if n in acc and acc[n] == acc[n] else "—" for n in names) + " |")
    return "\n".join(lines)


def write_report(result: dict, out: Path, title: str = "") -> None:
    """``evaluation.json``, ``points.csv``, the Figure-5/6-style PNGs and, with baselines, the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "evaluation.json", json.dumps(result, indent=1) + "\n")
    rows = result["points"]
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "points.csv", buf.getvalue())
    curve_rows = [{**r, "attack": f"{r['attack']} ({r['norm']})" if r["minimum_norm"] else r["attack"]} for r in rows]
    bundle_rows = [r for r in curve_rows if r["defense"] in (*result["layers"], COMPOSITE)]
    for metric in ("acc_detector", "acc_rc", "detection_rate"):
        budget_curves(bundle_rows, out / f"{metric}.png", metrics=(metric,), title=f"{title} {metric} ({THREAT_MODEL})".strip())
    if result.get("baselines"):
        compared = [r for r in curve_rows if r["defense"] not in result["layers"]]
        detectors = [r for r in compared if r["defense"] not in (*result.get("robust", []), UNDEFENDED)]
        budget_curves(detectors, out / "compare_acc_detector.png", metrics=("acc_detector",), title=f"{title} Acc_detector ({THREAT_MODEL})".strip())
        budget_curves(compared, out / "compare_acc_rc.png", metrics=("acc_rc",), title=f"{title} Acc_RC ({THREAT_MODEL})".strip())
        atomic_write_text(out / "comparison.md", comparison_table(result) + "\n")

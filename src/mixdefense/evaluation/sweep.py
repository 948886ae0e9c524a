"""The bundle sweep's results: rows → metrics per (attack, ε, defense, operating point), tables, files, figures.

:func:`summarize` turns the rows the evaluation loop gathers (``lightning_modules.evaluation``)
into one record per (point, defense, operating point) with :func:`point_row`; :func:`format_table`,
:func:`comparison_table` and :func:`write_report` present them (``evaluation.json``,
``points.csv``, Figure-5/6-style PNGs per operating point, ``comparison.md``).  Plain PyTorch: no Lightning.

Row layouts (float tensors): AE rows ``[point, success, adv_correct, norm, adv margins (L)]``;
clean rows ``[correct, margins (L)]`` (every clean evaluation image); baseline rows ``[point,
baseline, success, adv_correct, norm, adv margin]``; baseline clean rows ``[baseline, correct,
margin]``.  A margin is a layer's score over its deployed threshold (``> 1``: the file as shipped
rejects).

**Operating points** (``cutoffs``): ``{frr: {defense: cut-offs [k]}}``, one cut-off per margin
column of the defense (:func:`mixdefense.calibration.margin_cutoffs` sets them on the correctly
classified calibration images): a defense rejects where some column's margin exceeds its cut-off.
Every defense is reported at every rate, so compared detectors pay the same clean cost.
The clean side of every rate is the **fixed clean set**: the correctly classified clean
evaluation images (:mod:`mixdefense.evaluation.points`).
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
from mixdefense.metrics import wilson_interval

COMPOSITE = "mixdefense"
UNDEFENDED = "undefended"
BASELINE_WIDTH = 6  # [point, baseline, success, adv_correct, norm, adv margin]
#: every AE of the sweep is made against the bare classifier (Madry's model: against itself)
THREAT_MODEL = "oblivious attacker: AEs made against the bare classifier"


def baseline_table(point, b, success, correct, norm, adv_margin) -> torch.Tensor:
    """Rows ``[n, BASELINE_WIDTH]`` of one compared defense on ``n`` AEs."""
    return torch.stack([point, torch.full_like(point, float(b)), success, correct, norm, adv_margin.float()], 1)


def frr_tag(frr: float) -> str:
    """``0.01 → "frr1"``, ``0.005 → "frr0.5"``: file-name tag of an operating point."""
    return f"frr{100 * frr:g}"


def deployed_cutoffs(layer_names: Sequence[str], baselines: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Every defense at its files' own thresholds (every cut-off 1)."""
    out = {name: torch.ones(1) for name in layer_names}
    out[COMPOSITE] = torch.ones(len(layer_names))
    out.update({name: torch.ones(1) for name in baselines})
    return out


def _decide(margins: torch.Tensor, cut: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rejected [N], score [N])`` of margins ``[N, k]`` at cut-offs ``[k]``: score = max_k m / cut.
    ``cut=None``: a defense that never rejects (a robust classifier), score 0."""
    if margins.shape[0] == 0 or cut is None:
        return torch.zeros(margins.shape[0], dtype=torch.bool), torch.zeros(margins.shape[0])
    cut = cut.float().clamp_min(1e-12)
    return (margins > cut).any(1), (margins / cut).amax(1)


def point_row(p: dict, defense: str, frr, success, correct_adv, norm, adv_rejected, adv_score, clean_rejected,
              clean_score, min_successes: int, kept_by_aes: bool = False) -> dict:
    """One defense at one point and operating point: the point, the defense, ``frr_target`` and every
    metric of :func:`mixdefense.evaluation.points.point_metrics` (clean side: the fixed clean set).
    A point is kept when it has ``min_successes`` successful AEs (``kept_by_aes``: AEs)."""
    m = point_metrics(success, correct_adv, norm, adv_rejected, adv_score, clean_rejected, clean_score)
    return {"attack": p["attack"], "norm": p["norm"], "eps": p["eps"], "minimum_norm": p["minimum_norm"], "defense": defense,
            "frr_target": frr, **m, "kept": (m["num_aes"] if kept_by_aes else m["num_successful"]) >= min_successes}


def _clean_entry(correct: torch.Tensor, rejected: torch.Tensor) -> dict:
    """A defense's record on the clean evaluation set: false rejection (correct images), rejected misclassified ones."""
    n_ok, n_bad = int(correct.sum()), int((~correct).sum())
    k_fr, k_bad = int((rejected & correct).sum()), int((rejected & ~correct).sum())
    lo, hi = wilson_interval(k_fr, n_ok)
    return {"false_rejection": k_fr / n_ok if n_ok else math.nan, "false_rejection_ci_low": lo, "false_rejection_ci_high": hi,
            "correctly_classified": n_ok, "misclassified": n_bad, "misclassified_rejected": k_bad,
            "accuracy": int((correct & ~rejected).sum()) / len(correct) if len(correct) else math.nan}


def summarize(ae: torch.Tensor, clean: torch.Tensor, points: list[dict], layer_names: list[str],
              min_successes: int, cutoffs: dict[float, dict[str, torch.Tensor]] | None = None,
              baselines: list[str] | None = None, baseline_rows: torch.Tensor | None = None,
              baseline_clean: torch.Tensor | None = None, robust: Sequence[str] = ()) -> dict:
    """Every metric from the gathered rows (see :class:`MixDefenseEvaluation`), at every operating point.

    Defenses: each bundle layer alone, the composite (``mixdefense``), the undefended classifier
    (never rejects; Acc_RC = share of AEs still classified right) and each baseline (``robust``:
    the names of robust classifiers, attacked on their own, never rejecting).  ``cutoffs``: see the
    module docstring; ``None`` reports every defense at its files' own thresholds (key ``None``).
    A robust classifier's points are kept when it was attacked on ≥ ``min_successes`` images (its
    successes are few by design); every other point needs ``min_successes`` successful AEs.
    """
    baselines = baselines or []
    detectors = [b for b in baselines if b not in robust]
    cutoffs = cutoffs if cutoffs is not None else {None: deployed_cutoffs(layer_names, detectors)}
    n_layers = len(layer_names)
    columns = {name: [i] for i, name in enumerate(layer_names)}
    columns[COMPOSITE] = list(range(n_layers))
    correct, clean_m = clean[:, 0].bool(), clean[:, 1:]
    bc = baseline_clean if baseline_clean is not None else torch.empty(0, 3)
    bl = baseline_rows if baseline_rows is not None else torch.empty(0, BASELINE_WIDTH)
    clean_summary: dict = {"images": int(len(clean)), "correctly_classified": int(correct.sum()),
                           "accuracy_classifier": float(correct.float().mean()) if len(clean) else math.nan,
                           "baselines": {}, "operating_points": {}}
    for b, name in enumerate(baselines):  # a baseline's own classifier (Madry; MagNet's reformer) on the clean images
        sel = bc[bc[:, 0] == b]
        clean_summary["baselines"][name] = {"images": len(sel), "accuracy_classifier": float(sel[:, 1].mean()) if len(sel) else math.nan}
    rows = []
    for frr, cuts in cutoffs.items():
        # the fixed clean set of each defense: its verdicts on the correctly classified clean images
        fixed, op = {}, {}
        for d, idx in columns.items():
            rej, score = _decide(clean_m[:, idx], cuts[d])
            fixed[d] = (rej[correct], score[correct])
            op[d] = _clean_entry(correct, rej)
        for b, name in enumerate(baselines):
            sel = bc[bc[:, 0] == b]
            ok = sel[:, 1].bool()
            rej, score = _decide(sel[:, 2:3], cuts[name] if name in detectors else None)
            fixed[name] = (rej[ok], score[ok])
            op[name] = _clean_entry(ok, rej)
        op[UNDEFENDED] = _clean_entry(correct, torch.zeros_like(correct))
        clean_summary["operating_points"][str(frr)] = op
        for pid, p in enumerate(points):
            sel = ae[ae[:, 0] == pid] if len(ae) else ae
            success, correct_adv, norm, adv_m = sel[:, 1].bool(), sel[:, 2].bool(), sel[:, 3], sel[:, 4:4 + n_layers]
            for d, idx in columns.items():
                rej, score = _decide(adv_m[:, idx], cuts[d])
                r = point_row(p, d, frr, success, correct_adv, norm, rej, score, *fixed[d], min_successes)
                if d == COMPOSITE and r["num_successful"]:
                    hit = adv_m[success] > cuts[d].float()
                    first = torch.where(hit.any(1), hit.int().argmax(1), torch.full((int(success.sum()),), -1))
                    for i, name in enumerate(layer_names):
                        r[f"caught_by_{name}"] = float((first == i).float().mean())
                rows.append(r)
            never = torch.zeros(len(sel), dtype=torch.bool)
            rows.append(point_row(p, UNDEFENDED, frr, success, correct_adv, norm, never, never.float(),
                                  torch.zeros(int(correct.sum()), dtype=torch.bool), torch.zeros(int(correct.sum())),
                                  min_successes))
            for b, name in enumerate(baselines):
                bs = bl[(bl[:, 0] == pid) & (bl[:, 1] == b)] if len(bl) else bl
                rej, score = _decide(bs[:, 5:6], cuts[name] if name in detectors else None)
                rows.append(point_row(p, name, frr, bs[:, 2].bool(), bs[:, 3].bool(), bs[:, 4], rej, score, *fixed[name],
                                      min_successes, kept_by_aes=name in robust))
    return {"clean": clean_summary, "layers": layer_names, "baselines": baselines, "robust": list(robust),
            "operating_points": [None if f is None else float(f) for f in cutoffs],
            "min_successes": min_successes, "points": rows}


def _op_label(frr) -> str:
    return "the files' own thresholds" if frr is None else f"{100 * frr:g} % clean false rejection"


def format_table(result: dict) -> str:
    """The composite's points as a text table per operating point (attack, ε, success, Acc_detector, Acc_RC, catches)."""
    c = result["clean"]
    lines = [f"clean ({c['images']} test images, {c['correctly_classified']} classified right): accuracy "
             f"{100 * c['accuracy_classifier']:.1f} % without the defense",
             f"threat model: {THREAT_MODEL}; minimum-norm attacks (≤ε) count an image at ε iff its AE has norm ≤ ε"]
    pct = lambda v: "   —" if v != v else f"{100 * v:.1f}"  # noqa: E731
    for frr in result["operating_points"]:
        op = c["operating_points"][str(frr)]
        fr = ", ".join(f"{k} {100 * v['false_rejection']:.1f} % (+{v['misclassified_rejected']} of {v['misclassified']} "
                       "misclassified)" for k, v in op.items() if k != UNDEFENDED)
        lines += ["", f"== operating point: {_op_label(frr)} (thresholds on correctly classified calibration images) ==",
                  f"accuracy with the defense {100 * op[COMPOSITE]['accuracy']:.1f} % (rejections count as errors); "
                  f"clean rejection on the test images: {fr}",
                  f"{'attack':<16} {'eps':>9} {'AEs':>5} {'success':>8} {'detect':>7} {'Acc_det':>8} {'95 % CI':>11} "
                  f"{'Acc_RC':>7} {'AUROC':>6}  caught by"]
        for r in result["points"]:
            if r["defense"] != COMPOSITE or r["frr_target"] != frr:
                continue
            eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
            if r["minimum_norm"]:
                eps = "≤" + eps
            caught = ", ".join(f"{k[len('caught_by_'):]} {100 * v:.0f} %" for k, v in r.items() if k.startswith("caught_by_"))
            flag = "" if r["kept"] else f"  (sparse: {r['num_successful']} successful AEs < {result['min_successes']})"
            auroc = "  —" if r["auroc"] != r["auroc"] else f"{r['auroc']:.3f}"
            name = f"{r['attack']} ({r['norm']})" if r["minimum_norm"] else r["attack"]
            ci = "—" if r["acc_detector"] != r["acc_detector"] else \
                f"{100 * r['acc_detector_ci_low']:.1f}–{100 * r['acc_detector_ci_high']:.1f}"
            lines.append(f"{name:<16} {eps:>9} {r['num_aes']:>5} {pct(r['attack_success_rate']):>8} {pct(r['detection_rate']):>7} "
                         f"{pct(r['acc_detector']):>8} {ci:>11} {pct(r['acc_rc']):>7} {auroc:>6}  {caught}{flag}")
    return "\n".join(lines)


def comparison_table(result: dict, frr=None) -> str:
    """Markdown: mean Acc_detector and Acc_RC per attack and compared defense at one operating point.

    Compared defenses: the composite, the detector baselines, the robust classifiers and the
    undefended classifier, every detector at the same clean false-rejection rate ``frr`` (one of
    ``result["operating_points"]``).  Means run over the budget points the composite keeps (≥
    ``min_successes`` successful AEs) that the defense keeps too (``n`` = how many), so every column
    averages the same budgets.  Robust classifiers and the undefended classifier never reject: their
    Acc_detector is not defined ("—")."""
    never_reject = {*result.get("robust", []), UNDEFENDED}
    names = [COMPOSITE, *result.get("baselines", []), UNDEFENDED]
    pts_op = [r for r in result["points"] if r["frr_target"] == frr]
    common = {(r["attack"], r["norm"], r["eps"]) for r in pts_op if r["defense"] == COMPOSITE and r["kept"]}
    attacks = list(dict.fromkeys((r["attack"], r["norm"], r["minimum_norm"]) for r in pts_op))
    head = "| attack | " + " | ".join(f"{n} Acc_det / Acc_RC" for n in names) + " |"
    lines = [f"Operating point: {_op_label(frr)} for every detector; threat model: {THREAT_MODEL}.", "",
             head, "|" + "---|" * (len(names) + 1)]
    fmt = lambda v: f"{100 * sum(v) / len(v):.1f}" if v else "—"  # noqa: E731
    for attack, norm, minimum_norm in attacks:
        cells = []
        for n in names:
            pts = [r for r in pts_op if (r["attack"], r["norm"], r["minimum_norm"], r["defense"]) == (attack, norm, minimum_norm, n)
                   and r["kept"] and (r["attack"], r["norm"], r["eps"]) in common]
            det = [] if n in never_reject else [r["acc_detector"] for r in pts if r["acc_detector"] == r["acc_detector"]]
            rc = [r["acc_rc"] for r in pts if r["acc_rc"] == r["acc_rc"]]
            cells.append(f"{fmt(det)} / {fmt(rc)} (n={len(pts)})")
        label = f"{attack} ({norm}, minimum-norm)" if minimum_norm else attack
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    op = result["clean"]["operating_points"][str(frr)]
    lines.append("| clean accuracy (rejections count as errors) | " + " | ".join(
        f"{100 * op[n]['accuracy']:.2f} %" if n in op and op[n]["accuracy"] == op[n]["accuracy"] else "—" for n in names) + " |")
    split = result.get("test_images", {}).get("split", "test")
    lines.append(f"| clean false rejection (correctly classified {split} images) | " + " | ".join(
        f"{100 * op[n]['false_rejection']:.2f} %" if n in op and n not in never_reject else "—" for n in names) + " |")
    lines.append("| misclassified clean images rejected (a catch) | " + " | ".join(
        f"{op[n]['misclassified_rejected']} / {op[n]['misclassified']}" if n in op and n not in never_reject else "—"
        for n in names) + " |")
    return "\n".join(lines)


def write_report(result: dict, out: Path, title: str = "") -> None:
    """``evaluation.json``, ``points.csv``, the Figure-5/6-style PNGs per operating point (``<metric>_frr1.png``…)
    and, with baselines, ``comparison.md`` and the comparison figures."""
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
    tables = []
    for frr in result["operating_points"]:
        tag = "" if frr is None else "_" + frr_tag(frr)
        at = "" if frr is None else f" at {100 * frr:g} % FRR"
        curve_rows = [{**r, "attack": f"{r['attack']} ({r['norm']})" if r["minimum_norm"] else r["attack"]}
                      for r in rows if r["frr_target"] == frr]
        bundle_rows = [r for r in curve_rows if r["defense"] in (*result["layers"], COMPOSITE)]
        for metric in ("acc_detector", "acc_rc", "detection_rate"):
            budget_curves(bundle_rows, out / f"{metric}{tag}.png", metrics=(metric,),
                          title=f"{title} {metric}{at} ({THREAT_MODEL})".strip())
        if result.get("baselines"):
            compared = [r for r in curve_rows if r["defense"] not in result["layers"]]
            detectors = [r for r in compared if r["defense"] not in (*result.get("robust", []), UNDEFENDED)]
            budget_curves(detectors, out / f"compare_acc_detector{tag}.png", metrics=("acc_detector",),
                          title=f"{title} Acc_detector{at} ({THREAT_MODEL})".strip())
            budget_curves(compared, out / f"compare_acc_rc{tag}.png", metrics=("acc_rc",),
                          title=f"{title} Acc_RC{at} ({THREAT_MODEL})".strip())
            tables.append(comparison_table(result, frr))
    if tables:
        atomic_write_text(out / "comparison.md", "\n\n".join(tables) + "\n")

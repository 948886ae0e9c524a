"""The robust-accuracy table of the adaptive evaluation, with Tramèr's reduction (ICML 2022).

Per (norm, ε): the defended robust accuracy (the images no attack broke, per-image worst case over every
attack and goal, 95 % Wilson interval), the strongest single attack, the undefended classifier's and Madry's
robust accuracies, and beside them the best robust accuracy known for a classifier at ε/2
(:data:`KNOWN_ROBUST`, sourced).  Budgets ``ε`` are in [0, 1] pixel units (L2 over the whole image);
accuracies and rates are fractions in [0, 1].
"""

from __future__ import annotations

import math

import torch

from mixdefense.metrics import wilson_interval

#: Best robust accuracies known for *classifiers* (dataset, norm, ε, accuracy in [0, 1], source), for Tramèr's
#: reduction (a detector robust at ε gives an inefficient classifier robust at ε/2 with the same robust accuracy).
#: Only figures with a source; every other ε/2 reads "no known figure".
KNOWN_ROBUST = (
    ("cifar10", "linf", 8 / 255, 0.7371,
     "RobustBench CIFAR-10 L∞ 8/255 leaderboard: Bartoldson et al., ICML 2024, WideResNet-94-16, AutoAttack 73.71 % "
     "(robustbench model_info/cifar10/Linf/Bartoldson2024Adversarial_WRN-94-16.json; MeanSparse's 75.28 % "
     "AutoAttack entry falls to 73.10 % under APGD with BPDA there)"),
    ("cifar10", "l2", 0.5, 0.8497,
     "RobustBench CIFAR-10 L2 0.5 leaderboard: Wang et al., ICML 2023 (better diffusion models), WideResNet-70-16, "
     "AutoAttack 84.97 % (robustbench model_info/cifar10/L2/Wang2023Better_WRN-70-16.json; MeanSparse's 87.28 % "
     "entry falls to 84.33 % under APGD with BPDA there)"),
    ("mnist", "linf", 0.1, 0.9843,
     "Fan & Li, AAAI 2021 (AdvIBP, github.com/JmfanBU/AdvIBP README): dm-large at ε = 0.1, PGD-200 test error "
     "1.57 % (verified error 2.19 %)"),
)


def eps_label(eps: float, norm: str) -> str:
    """``0.03137 (8/255)`` for L∞ budgets on the 1/255 half-grid that are no round decimals, else ``%.4g``."""
    v = eps * 255
    if norm == "linf" and abs(2 * v - round(2 * v)) < 1e-6 and abs(100 * eps - round(100 * eps)) > 1e-6:
        return f"{eps:.4g} ({v:g}/255)"
    return f"{eps:.4g}"


def best_known(dataset: str, norm: str, eps: float) -> tuple[float | None, str]:
    """The best robust accuracy known for a classifier at exactly ``eps`` (:data:`KNOWN_ROBUST`), with its source."""
    for ds, n, e, acc, source in KNOWN_ROBUST:
        if ds == dataset and n == norm and math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12):
            return acc, source
    return None, "no known figure"


def worst_case(broken: list[torch.Tensor], n: int) -> torch.Tensor:
    """``[n]`` bool: broken by at least one of the per-attack vectors (each ``[n]`` bool)."""
    out = torch.zeros(n, dtype=torch.bool)
    for b in broken:
        out |= torch.as_tensor(b, dtype=torch.bool)
    return out


def rate_with_ci(k: int, n: int) -> tuple[float | None, list[float] | None]:
    """``(k / n, [low, high])``: a rate in [0, 1] and its 95 % Wilson interval; ``(None, None)`` when ``n == 0``."""
    if n == 0:
        return None, None
    lo, hi = wilson_interval(k, n)
    return k / n, [lo, hi]


def robust_entry(dataset: str, norm: str, eps: float, rows: list[tuple[dict, torch.Tensor]],
                 undefended_broken: torch.Tensor | None = None, madry_robust: torch.Tensor | None = None,
                 madry_note: str = "not shipped", clean_accuracy: float | None = None,
                 clean_accepted: torch.Tensor | None = None) -> dict:
    """One (norm, ε) row of the robust table from ``rows`` = ``[(row, per-image "pipeline fooled" [n] bool), ...]``.

    Defended robust accuracy = images no attack broke (a rejected AE counts as defended, an accepted wrong
    label as broken), 95 % Wilson interval; the strongest single attack = the row with the highest
    whole-pipeline success; the undefended classifier's robust accuracy = ``1 − undefended_broken``; Madry's =
    ``madry_robust`` (clean-correct and unbroken); Tramèr's reduction puts the best known robust accuracy of a
    classifier at exactly ε/2 beside the defended figure at ε.
    """
    if not rows:
        raise ValueError(f"no attack rows at {norm} ε={eps}")
    n = len(rows[0][1])
    broken = worst_case([v for _, v in rows], n)
    k = int((~broken).sum())
    acc, ci = rate_with_ci(k, n)
    strongest = max(rows, key=lambda rv: (rv[0]["mixdefense"], rv[0]["classifier"]))[0]
    half = eps / 2
    known, source = best_known(dataset, norm, half)
    out = {"norm": norm, "eps": eps, "eps_label": eps_label(eps, norm), "images": n, "attacks": len(rows),
           "defended_robust": k, "defended_robust_accuracy": acc, "defended_ci95": ci,
           "strongest_attack": f"{strongest['attack']} ({strongest['targets']})",
           "strongest_attack_family": strongest["family"], "strongest_attack_success": strongest["mixdefense"]}
    if clean_accepted is not None:
        out["defended_robust_and_clean_accepted"] = int(((~broken) & clean_accepted.cpu().bool()).sum()) / n
    out["clean_accuracy"] = clean_accuracy
    out["defended_robust_accuracy_all_test_images"] = clean_accuracy * acc if clean_accuracy is not None else None
    if undefended_broken is not None:
        out["undefended_robust_accuracy"], out["undefended_ci95"] = rate_with_ci(int((~undefended_broken).sum()), n)
    if madry_robust is not None:
        out["madry_robust_accuracy"], out["madry_ci95"] = rate_with_ci(int(madry_robust.sum()), n)
    out["madry"] = madry_note
    out.update(tramer_eps_half=half, tramer_eps_half_label=eps_label(half, norm), best_known_at_eps_half=known,
               best_known_source=source)
    return out


def _pct(v: float | None, ci: list[float] | None = None) -> str:
    """A rate in [0, 1] as ``12.3 %`` (with ``[lo, hi]`` in percent when ``ci`` is given); ``–`` for ``None``."""
    if v is None:
        return "–"
    return f"{100 * v:.1f} %" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def robust_markdown(dataset: str, entries: list[dict], note: str = "") -> str:
    """``robust_accuracy.md``: one table per norm."""
    lines = [f"# Robust accuracy: {dataset}", "",
             "Defended = MixDefense (an image counts as robust when no attack run at that ε, over every goal, made the "
             "pipeline accept a wrong label: per-image worst case; a rejected AE counts as defended).  Over the attacked, "
             "correctly classified test images; 95 % Wilson intervals.  Undefended = the bare classifier, Madry = the "
             "adversarially trained classifier, both under untargeted PGD with the same steps and restarts.  Tramèr "
             "(ICML 2022): a detector robust at ε implies an inefficient classifier robust at ε/2 with the same robust "
             "accuracy; the last columns give the best robust accuracy known for a classifier at exactly ε/2 (over all "
             "test images), to be read against the defended figure times the clean accuracy.", ""]
    if note:
        lines += [note, ""]
    for norm in dict.fromkeys(e["norm"] for e in entries):
        lines += [f"## {norm}", "",
                  "| ε | attacks | defended robust acc. [95 % CI] | strongest attack (pipeline success) | undefended | Madry "
                  "| defended × clean acc. | ε/2 | best known at ε/2 | source |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in (e for e in entries if e["norm"] == norm):
            madry = _pct(e.get("madry_robust_accuracy"), e.get("madry_ci95")) if e.get("madry_robust_accuracy") is not None \
                else e["madry"]
            known = _pct(e["best_known_at_eps_half"]) if e["best_known_at_eps_half"] is not None else "no known figure"
            source = e["best_known_source"] if e["best_known_at_eps_half"] is not None else "–"
            lines.append(f"| {e['eps_label']} | {e['attacks']} | {_pct(e['defended_robust_accuracy'], e['defended_ci95'])} "
                         f"| {e['strongest_attack']} ({_pct(e['strongest_attack_success'])}) "
                         f"| {_pct(e.get('undefended_robust_accuracy'), e.get('undefended_ci95'))} | {madry} "
                         f"| {_pct(e.get('defended_robust_accuracy_all_test_images'))} | {e['tramer_eps_half_label']} "
                         f"| {known} | {source} |")
        lines.append("")
    return "\n".join(lines)


def print_robust(entries: list[dict]) -> None:
    """The table of :func:`robust_entry` dicts on stdout, one line per (norm, ε)."""
    print(f"{'norm':<4} {'eps':>18} {'defended [95% CI]':>24} {'strongest attack':>28} {'undefended':>10} {'madry':>8} "
          f"{'eps/2':>18} best known at eps/2")
    for e in entries:
        madry = _pct(e.get("madry_robust_accuracy")) if e.get("madry_robust_accuracy") is not None else e["madry"][:12]
        known = _pct(e["best_known_at_eps_half"]) if e["best_known_at_eps_half"] is not None else "no known figure"
        print(f"{e['norm']:<4} {e['eps_label']:>18} {_pct(e['defended_robust_accuracy'], e['defended_ci95']):>24} "
              f"{e['strongest_attack']:>28} {_pct(e.get('undefended_robust_accuracy')):>10} {madry:>8} "
              f"{e['tramer_eps_half_label']:>18} {known}")


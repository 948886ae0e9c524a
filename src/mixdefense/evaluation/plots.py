"""Figures (matplotlib, Agg backend): budget curves, score histograms and image grids, written as PNG."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _eps_label(norm: str) -> str:
    return "ε (L∞, ×1/255)" if norm == "linf" else "ε (L2, whole image, [0, 1] scale)"


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write ``fig`` as a PNG atomically (a temporary file, then a rename) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def budget_curves(
    rows: Sequence[dict], path: str | Path, metrics: Sequence[str] = ("detection_rate", "acc_detector"),
    title: str = "", group: str = "defense",
) -> Path:
    """One panel per attack; a line per (``group`` value, metric) over ε.

    ``rows``: dicts with ``attack``, ``norm``, ``eps``, ``kept`` and the metric keys.  No point is
    dropped: where a row has ``<metric>_ci_low`` / ``_ci_high`` its 95 % interval is drawn as a band,
    and points with ``kept`` False (fewer successful AEs than the sweep's ``min_successes``) are drawn
    hollow, so sparse points show with their (wide) interval.
    """
    by_attack: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_attack[r["attack"]].append(r)
    n = len(by_attack)
    cols = min(n, 4)  # wrap long sweeps into rows of 4 panels
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.6 * rows_), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    # one colour per line label across all panels, so a defense reads the same everywhere
    labels = dict.fromkeys(f"{r.get(group, '')} {m}".strip() for r in rows for m in metrics)
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (attack, items) in zip(axes.flat, by_attack.items()):
        norm = items[0]["norm"]
        scale = 255.0 if norm == "linf" else 1.0
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for r in items:
            for m in metrics:
                lines[(r.get(group, ""), m)].append(r)
        for (g, m), pts in lines.items():
            pts = sorted((p for p in pts if p[m] == p[m]), key=lambda p: p["eps"])  # every point with a value
            if not pts:
                continue
            label = f"{g} {m}".strip()
            bold = g == "mixdefense"  # the composite on top, thicker, so equal curves do not hide it
            xs, ys = [p["eps"] * scale for p in pts], [p[m] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=label, color=colours[label], lw=2.4 if bold else 1.4,
                              zorder=3 if bold else 2)
            lo, hi = [p.get(f"{m}_ci_low", float("nan")) for p in pts], [p.get(f"{m}_ci_high", float("nan")) for p in pts]
            if any(v == v for v in lo):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            sparse = [(x, y) for x, y, p in zip(xs, ys, pts) if not p.get("kept", True)]
            if sparse:
                ax.plot(*zip(*sparse), ls="none", marker="o", ms=5, mfc="white", mec=line.get_color(), zorder=4)
        ax.set_title(attack)
        ax.set_xlabel(_eps_label(norm))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("rate")
    legend = {}  # every line's label once, from whichever panel has it
    for ax in axes.flat[:n]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        axes.flat[n - 1].legend(list(legend.values()), list(legend), fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def score_histograms(
    scores: dict[str, torch.Tensor], threshold: float | None, path: str | Path, title: str = "", log: bool = True,
    xlabel: str = "score",
) -> Path:
    """Overlaid histograms of score sets, with the threshold (when given) as a vertical line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    vals = {k: v.detach().double().cpu() for k, v in scores.items()}
    allv = torch.cat(list(vals.values()))
    if log:
        allv = allv[allv > 0]
        lo, hi = allv.min().log10().item(), allv.max().log10().item()
        edges = torch.logspace(lo, hi, 80).numpy()
        ax.set_xscale("log")
    else:
        edges = torch.linspace(allv.min().item(), allv.max().item(), 80).numpy()
    for name, v in vals.items():
        ax.hist(v.numpy(), bins=edges, alpha=0.55, label=f"{name} (n={len(v)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def case_study_grid(columns: Sequence[tuple[str, torch.Tensor]], path, title: str = "", row_labels: Sequence[str] | None = None):
    """Save a labelled grid (one column per ``(header, images [R, C, S, S])``, one row per image) as a PNG, atomically."""
    rows, cols = columns[0][1].shape[0], len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.05 * cols + 0.6, 1.1 * rows + 0.7), squeeze=False)
    for j, (header, imgs) in enumerate(columns):
        for i in range(rows):
            ax = axes[i][j]
            img = imgs[i].detach().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(header, fontsize=6.5)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path, dpi=130)

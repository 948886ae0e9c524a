"""``mixdefense saec calibrate|evaluate --config experiments/<dataset>/saec.yaml [key=value ...]``.

* ``calibrate``: calibrates SAEC on clean training images and uniform-noise copies (never
  on AEs), saves the layer (``output.layer``) and writes a report — JSON with the
  threshold, the rates it achieved, the settings and the clean false-rejection rate on
  the test images, and a PNG of the clean/noisy score histograms with the threshold.
  ``saec.luminance=true`` adds the luminance test (channel-tied noise, issue 23): the
  thresholds of both tests are set jointly, the clean budget bounding their OR, and the
  report gains a ``luminance`` record (MixDefense+; see :mod:`mixdefense.layers.luminance`).
* ``evaluate``: the SAEC curves against attacks — detection rate of successful AEs and
  ``Acc_detector`` (eq. 7, half and half) over ε for FGSM, BIM (L∞) and FGM, BIM (L2) on
  test images the classifier gets right; JSON, CSV and PNG.

The YAML is read with OmegaConf (``${dataset}`` interpolations allowed); trailing
``key=value`` arguments override it (OmegaConf dot-list).  Data arrives through the
``load_images`` callable that :mod:`mixdefense.cli` passes in, so this module needs no
datamodule import.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mixdefense.classifiers import load_classifier
from mixdefense.commands import Data
from mixdefense.evaluation.curves import budget_curve, correctly_classified
from mixdefense.evaluation.plots import budget_curves, score_histograms
from mixdefense.io import atomic_write_text
from mixdefense.layers.saec import SAEC

LoadImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]
REQUIRED = ("dataset", "saec", "calibration", "output")
#: the ``saec:`` keys (SAEC's constructor arguments); ``luminance: true`` adds the luminance test (MixDefense+)
SAEC_SETTINGS = {"p", "kernel", "bins", "value_range", "gray_mode", "luminance", "luminance_fraction"}


def load_config(path: str, overrides: list[str]):
    """The YAML merged with ``key=value`` overrides, interpolations resolved; checked for required keys."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config not found: {path}")
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing section(s) {missing}")
    unknown = set(cfg.saec) - SAEC_SETTINGS
    if unknown:
        raise ValueError(f"{path}: unknown saec setting(s) {sorted(unknown)}")
    return OmegaConf.to_container(cfg, resolve=True)


def calibrate(cfg: dict, load_images: LoadImages) -> dict:
    c = cfg["calibration"]
    x_train, _ = load_images(cfg["dataset"], "train", c["num_images"], seed=c.get("seed", 0))
    saec = SAEC(**cfg["saec"])
    start = time.perf_counter()
    cal = saec.calibrate(x_train, noise=tuple(c["noise"]), max_clean_rejection=c["max_clean_rejection"],
                         max_images=None, seed=c.get("seed", 0))
    seconds = time.perf_counter() - start
    x_test, _ = load_images(cfg["dataset"], "test", cfg.get("evaluation", {}).get("num_clean_test"))
    test_frr = saec(x_test).float().mean().item()
    layer = Path(cfg["output"]["layer"])
    saec.save(layer, dataset=cfg["dataset"], calibration=cal.as_dict(), test_clean_rejection=test_frr)
    # the calibration scores again, for the figure (same seed: the same noisy copies)
    gen = torch.Generator().manual_seed(c.get("seed", 0))
    report_dir = Path(cfg["output"]["report_dir"])
    lo, hi = c["noise"]
    sc, sn = [], []
    for xb in x_train.split(1000):
        amp = lo + (hi - lo) * torch.rand(xb.shape[0], 1, 1, 1, generator=gen)
        sn.append(saec.score((xb + (2 * torch.rand(xb.shape, generator=gen) - 1) * amp).clamp(0, 1)))
        sc.append(saec.score(xb))
    png = score_histograms(
        {"clean (train)": torch.cat(sc), f"uniform noise {lo * 255:.0f}–{hi * 255:.0f}/255": torch.cat(sn), "clean (test)": saec.score(x_test)},
        cal.threshold, report_dir / "saec_calibration.png", xlabel="noise-level score NL (reject below the threshold)",
        title=f"SAEC on {cfg['dataset']}: threshold at ≤{c['max_clean_rejection']:.0%} clean rejection",
    )
    rule = "reject when NL < threshold"
    report = {"dataset": cfg["dataset"], "settings": saec.settings(), "calibration": cal.as_dict(),
              "rule": rule + (" or a luminance statistic > its threshold" if saec.luminance else ""),
              **({"luminance": saec.luminance_calibration().as_dict()} if saec.luminance else {}),
              "test_clean_rejection_rate": test_frr,
              "num_test_images": len(x_test), "calibration_seconds": seconds, "layer": str(layer), "figure": str(png)}
    atomic_write_text(report_dir / "saec_calibration.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def evaluate(cfg: dict, load_images: LoadImages) -> list[dict]:
    e = cfg["evaluation"]
    for path, how in ((cfg["output"]["layer"], f"mixdefense saec calibrate --config experiments/{cfg['dataset']}/saec.yaml"),
                      (e["classifier"], f"make train-classifier DATASET={cfg['dataset']}")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: make it first with `{how}`")
    saec = SAEC.load(cfg["output"]["layer"])
    model = load_classifier(e["classifier"])
    x, y = load_images(cfg["dataset"], "test", None)
    x, y = correctly_classified(model, x, y, e["num_images"])

    def detector(imgs: torch.Tensor):
        if saec.luminance:  # both tests: the layer's verdict and its margin (> 1 = rejected)
            return saec(imgs), saec.margin(imgs)
        s = saec.score(imgs)
        return s < saec.threshold, -s  # larger = more adversarial

    rows = []
    for attack in e["attacks"]:
        budgets = e.get("budgets", {}).get(attack)
        for r in budget_curve(model, detector, attack, x, y, budgets=budgets, min_successes=e.get("min_successes", 100)):
            rows.append({"defense": "SAEC", **r.as_dict()})
    out = Path(cfg["output"]["report_dir"])
    atomic_write_text(out / "saec_attacks.json", json.dumps({"dataset": cfg["dataset"], "num_images": len(y),
                                                          "settings": saec.settings(), "threshold": float(saec.threshold),
                                                          "rows": rows}, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "saec_attacks.csv", buf.getvalue())
    budget_curves(rows, out / "saec_attacks.png", metrics=("detection_rate", "acc_detector"),
                  title=f"SAEC on {cfg['dataset']} ({len(y)} correctly classified test images)")
    print(f"{'attack':<10} {'eps':>8} {'succ':>5} {'detect':>7} {'acc_det':>7} {'clean_rej':>9}")
    for r in rows:
        eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
        flag = "" if r["kept"] else "  (dropped: < min successes)"
        print(f"{r['attack']:<10} {eps:>8} {r['num_successful']:>5} {r['detection_rate']:>7.3f} {r['acc_detector']:>7.3f} {r['clean_rejection_rate']:>9.3f}{flag}")
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``action``, ``config`` and ``overrides`` (the ``key=value`` arguments, before or after ``--config``)."""
    ap = argparse.ArgumentParser(prog="mixdefense saec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("calibrate", "evaluate"))
    ap.add_argument("--config", required=True, help="experiments/<dataset>/saec.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value OmegaConf overrides, e.g. calibration.num_images=2000")
    return ap.parse_intermixed_args(argv)  # plain parse_args leaves overrides after --config unrecognised


def main(argv: list[str], data: Data) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.action == "calibrate":
        calibrate(cfg, data.load_images)
    else:
        evaluate(cfg, data.load_images)
    return 0

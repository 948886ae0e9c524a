"""``mixdefense contranet evaluate --dataset <ds>``: build, calibrate and measure the ContraNet detector.

Steps (paper §4 and §5):

1. load the exported cGAN (``artifacts/<ds>/cgan.pt``), the metric model M
   (``artifacts/<ds>/metric.pt``) and the classifier;
2. **calibrate** on the *correctly classified* clean images of the dataset's calibration split
   (``experiments/<ds>/detector.yaml``: the validation split the training configs hold out, or a
   test-set calibration split, :mod:`mixdefense.splits`) at ``--target-frr`` (default 5 %)
   clean false rejection — for each score variant: ``metric`` (M, the paper's),
   ``l2`` and ``ssim`` (rule-based distances instead of M) and ``metric+ssim`` (the OR of
   both at a *combined* 5 %, as the authors' follow-up code does);
3. save the ``metric`` detector as a plain-weights file (``--bundle``, default
   ``artifacts/candidates/<ds>/contranet.pt``: a shipped file is replaced only when asked);
4. on test images (``--split selection``: the selection split's, where variants are chosen): **label AUROC**
   — score with the true label against score with random wrong labels (``--wrong-labels`` per image) — per
   variant;
5. **attacks** on correctly classified images of the same split: FGSM and PGD (L∞) at ``--eps``
   (×1/255) and C&W (L2, torchattacks defaults of :mod:`mixdefense.attacks`); per attack
   point and variant: attack success rate, detection rate of the successful AEs at the
   calibrated threshold, clean false rejection on their originals, AUROC, Acc_detector.

Writes ``<out>/contranet_eval.json``, ``<out>/contranet_table.md`` and
``<out>/label_scores.png`` (histograms of the M score with the true and with wrong labels,
and the threshold).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mixdefense.attacks import get_attack, run_attack, run_sweep
from mixdefense.calibration import calibration_record
from mixdefense.classifiers import load_classifier
from mixdefense.commands import CALIBRATION_SPLITS, Data, operating_point
from mixdefense.evaluation.curves import correctly_classified, point_metrics, predict
from mixdefense.evaluation.plots import score_histograms
from mixdefense.io import atomic_write_text, check_calibration_held_out, training_data
from mixdefense.layers.contranet import ContraNet, predicted_labels
from mixdefense.metrics import detection_auroc
from mixdefense.nets import load_cgan, load_metric
from mixdefense.triplets import sample_confusable_labels, sample_wrong_labels

LoadImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]
#: ``(dataset, split, n) -> (x, y, source record)`` (``mixdefense.cli.load_calibration_images``)
LoadCalibration = Callable[[str, str, int], tuple[torch.Tensor, torch.Tensor, dict]]

#: Score variants compared (name → the scores OR-combined).
VARIANTS: dict[str, tuple[str, ...]] = {"metric": ("metric",), "l2": ("l2",), "ssim": ("ssim",),
                                        "metric+ssim": ("metric", "ssim")}


def parse_args(argv: list[str], data: Data) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mixdefense contranet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["evaluate"])
    data.add_dataset_argument(ap)
    ap.add_argument("--cgan", help="exported cGAN (default artifacts/<dataset>/cgan.pt)")
    ap.add_argument("--metric", help="exported metric model M (default artifacts/<dataset>/metric.pt)")
    ap.add_argument("--classifier", help="target classifier (default artifacts/<dataset>/classifier.pt)")
    ap.add_argument("--bundle", help="where to save the calibrated detector (default artifacts/candidates/<dataset>/contranet.pt)")
    ap.add_argument("--target-frr", type=float, default=0.05, help="clean false-rejection rate of the thresholds")
    ap.add_argument("--calibration-images", type=int, default=2000, help="clean images for the thresholds")
    ap.add_argument("--config", default=None,
                    help="operating-point file whose calibration_split is the default of --calibration-split "
                         "(default experiments/<ds>/detector.yaml)")
    ap.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default=None,
                    help="the thresholds' images (default: the operating point's, --config): "
                         "the validation split (val: single images; val_groups: whole groups such as GTSRB's sign tracks), or a test-set calibration split (mixdefense.splits)")
    ap.add_argument("--num-images", type=int, default=1000, help="images (of --split) for the label AUROC and the attacks")
    ap.add_argument("--split", choices=("test", "selection"), default="test",
                    help="where the label AUROC and the attacks are measured: the protocol's test split (what results "
                         "report) or its selection split (where choices between variants are made)")
    ap.add_argument("--wrong-labels", type=int, default=3, help="random wrong labels per test image (label AUROC)")
    ap.add_argument("--eps", type=float, nargs="+", default=[2, 4, 8],
                    help="budgets of the budgeted attacks: ×1/255 for L∞ ones, whole-image L2 for L2 ones")
    ap.add_argument("--attacks", nargs="+", default=["fgsm", "pgd_linf", "cw"], help="attacks to run")
    ap.add_argument("--unbudgeted-images", type=int, default=1000,
                    help="C&W and DeepFool (slow, no budget) run on the first N of the correctly classified images")
    ap.add_argument("--min-successes", type=int, default=100, help="drop points with fewer successful AEs (paper: 100)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--out", help="report folder (default results/<dataset>/contranet)")
    return ap.parse_args(argv)


class ScoreTable:
    """All three raw scores of images under the classifier's labels, computed once per image set.

    ``__call__(x) → (y_pred [N], {score: [N]})``; remembers the last few inputs by identity so
    every variant's detector reuses one reconstruction pass.
    """

    def __init__(self, full: ContraNet, classifier: torch.nn.Module, batch_size: int = 250):
        self.full, self.classifier, self.batch_size = full, classifier, batch_size
        # (the tensor itself, its labels, its scores): holding the tensor keeps its identity unique
        self._memo: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        for seen, y, table in self._memo:
            if seen is x:
                return y, table
        y = torch.cat([predicted_labels(self.classifier, c) for c in x.split(self.batch_size)])
        table = self.full.score_table(x, y, self.batch_size)
        self._memo = self._memo[-3:] + [(x, y, table)]
        return y, table

    def detector(self, variant: ContraNet) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``x → (rejected [N], score [N])`` of one calibrated variant, from the shared table."""
        def detect(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            parts = {s: self(x)[1][s] for s in variant.scores}
            return variant.decide(parts), variant.combine(parts)
        return detect


def build_variants(cgan, metric, x_cal: torch.Tensor, y_cal_pred: torch.Tensor, target_frr: float,
                   batch_size: int) -> tuple[ContraNet, dict[str, ContraNet]]:
    """The all-scores scorer and one calibrated :class:`ContraNet` per variant (thresholds from one table)."""
    full = ContraNet(cgan, metric, ("metric", "l2", "ssim"))
    table = full.score_table(x_cal, y_cal_pred, batch_size)
    variants = {}
    for name, scores in VARIANTS.items():
        det = ContraNet(cgan, metric, scores)
        det.calibrate_from_table({s: table[s] for s in scores}, target_frr)
        variants[name] = det
    return full, variants


def label_auroc(full: ContraNet, variants: dict[str, ContraNet], x: torch.Tensor, y: torch.Tensor,
                wrong_sets: dict[str, torch.Tensor], batch_size: int
                ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Per set of wrong labels and variant: AUROC of score(x, y_true) against score(x, y′).

    ``wrong_sets`` maps a name to wrong labels ``[B, w]`` (``w`` per image, never the true one).
    Returns the AUROCs ``{set: {variant: auroc}}`` and the metric scores for a histogram (true
    labels and the first set's wrong labels).
    """
    true_tab = full.score_table(x, y, batch_size)
    out, first = {}, None
    for set_name, y_wrong in wrong_sets.items():
        wrong_tabs = [full.score_table(x, y_wrong[:, j], batch_size) for j in range(y_wrong.shape[1])]
        wrong_tab = {s: torch.cat([t[s] for t in wrong_tabs]) for s in full.scores}
        first = first or wrong_tab
        out[set_name] = {name: detection_auroc(det.combine({s: true_tab[s] for s in det.scores}),
                                               det.combine({s: wrong_tab[s] for s in det.scores}))
                         for name, det in variants.items()}
    return out, {"true label": true_tab["metric"], "wrong labels": first["metric"]}


def attack_points(args, classifier, table: ScoreTable, variants: dict[str, ContraNet], x: torch.Tensor,
                  y: torch.Tensor) -> list[dict]:
    """Detection metrics per (attack, ε, variant) on AEs from correctly classified ``(x, y)``."""
    rows = []
    for attack in args.attacks:
        start = time.perf_counter()
        spec = get_attack(attack)
        if spec.budgeted:
            eps = [e / 255 for e in args.eps] if spec.norm == "linf" else list(args.eps)
            advs = [[] for _ in eps]
            for xb, yb in tqdm(list(zip(x.split(args.batch_size), y.split(args.batch_size))), desc=attack, leave=False):
                for i, xa in enumerate(run_sweep(attack, classifier, xb, yb, eps)):
                    advs[i].append(xa)
            sets = [(e, torch.cat(a)) for e, a in zip(eps, advs)]
        else:
            xs, ys = x[: args.unbudgeted_images], y[: args.unbudgeted_images]
            parts = [run_attack(attack, classifier, xb, yb) for xb, yb in
                     tqdm(list(zip(xs.split(args.batch_size), ys.split(args.batch_size))), desc=attack, leave=False)]
            sets = [(float("nan"), torch.cat(parts))]
        seconds = time.perf_counter() - start
        norm = spec.norm
        # one clean tensor per attack, so the score table of the originals is computed once
        n = len(sets[0][1])
        x_src, y_src = (x, y) if n == len(x) else (x[:n], y[:n])
        for eps, x_adv in sets:
            pred_adv = predict(classifier, x_adv)
            for name, det in variants.items():
                r = point_metrics(attack, norm, eps, x_src, y_src, x_adv, pred_adv, table.detector(det), args.min_successes)
                rows.append({**r.as_dict(), "defense": name, "attack_seconds": round(seconds, 1)})
    return rows


def _fmt(v: float, pct: bool = True) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{100 * v:.1f}" if pct else f"{v:.4f}")


def markdown_table(result: dict) -> str:
    names = list(VARIANTS)
    source = ("correctly classified test-calibration" if result.get("calibration_source", {}).get("split") == "test_calibration"
              else "correctly classified validation")
    split = result.get("split", "test")
    lines = [(f"# ContraNet on {result['dataset']}: {result['num_images']} {split} images, thresholds at "
              f"{100 * result['target_frr']:.0f} % clean false rejection ({result['calibration_images']} {source} images)"), "",
             "Label AUROC (score with the true label vs with wrong labels):", "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(_fmt(result["label_auroc"][n], False) for n in names) + " |", "",
             "Label AUROC against the wrong label the classifier scores highest (the class an attack most likely reaches):",
             "",
             "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(_fmt(result.get("label_auroc_confusable", {}).get(n), False) for n in names) + " |", "",
             f"Clean false rejection on the {split} images (predicted labels): "
             + ", ".join(f"{n} {_fmt(result['test_clean_frr'][n])} %" for n in names), "",
             f"Attacks (successful AEs from correctly classified {split} images): detection rate % / AUROC "
             "(points with fewer than the minimum successful AEs in brackets)", "",
             "| attack | ε | success % | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    points: dict[tuple, dict[str, dict]] = {}
    for r in result["attacks"]:
        points.setdefault((r["attack"], r["eps"]), {})[r["defense"]] = r
    for (attack, eps), by in points.items():
        any_r = next(iter(by.values()))
        e = "default" if math.isnan(eps) else (f"{eps * 255:.0f}/255" if any_r["norm"] == "linf" else f"{eps:g}")
        cells = []
        for n in names:
            r = by[n]
            c = f"{_fmt(r['detection_rate'])} / {_fmt(r['auroc'], False)}"
            cells.append(c if r["kept"] else f"({c})")
        lines.append(f"| {attack} | {e} | {_fmt(any_r['attack_success_rate'])} ({any_r['num_successful']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def joint_training_data(cgan_file: str | Path, metric_file: str | Path) -> dict:
    """The training record a calibrated ContraNet keeps of its two parts (``mixdefense bundle`` checks its
    ``val_grouping`` before calibrating on ``val_groups``): the cGAN's, with ``val_grouping`` only where M agrees."""
    cgan, metric = training_data(cgan_file), training_data(metric_file)
    joint = {**cgan, "cgan": cgan, "metric": metric}
    if cgan.get("val_grouping") != metric.get("val_grouping"):
        joint["val_grouping"] = "differs between the cGAN and M"
    return joint


def evaluate(args: argparse.Namespace, load_images: LoadImages, load_calibration: LoadCalibration) -> dict:
    ds = args.dataset
    split = args.calibration_split or operating_point(ds, args.config)["calibration_split"]
    cgan_file, metric_file = args.cgan or f"artifacts/{ds}/cgan.pt", args.metric or f"artifacts/{ds}/metric.pt"
    check_calibration_held_out(split, {"cGAN": cgan_file, "M": metric_file})
    cgan, metric = load_cgan(cgan_file), load_metric(metric_file)
    classifier = load_classifier(args.classifier or f"artifacts/{ds}/classifier.pt")
    out = Path(args.out or f"results/{ds}/contranet")
    t0 = time.perf_counter()

    x_all, y_all, source = load_calibration(ds, split, args.calibration_images)
    pred = predict(classifier, x_all)
    source = {**source, **calibration_record(y_all, pred)}
    x_cal, y_cal = x_all[pred == y_all], pred[pred == y_all]  # the correctly classified images set the thresholds
    full, variants = build_variants(cgan, metric, x_cal, y_cal, args.target_frr, args.batch_size)
    bundle = Path(args.bundle or f"artifacts/candidates/{ds}/contranet.pt")
    variants["metric"].save(bundle, dataset=ds, data=joint_training_data(cgan_file, metric_file))

    x_test, y_test = load_images(ds, args.split, args.num_images)
    with torch.no_grad():
        logits = torch.cat([classifier(b) for b in x_test.split(args.batch_size)])
    wrong_sets = {"random": sample_wrong_labels(y_test, full.num_classes, args.wrong_labels, torch.Generator().manual_seed(0)),
                  "confusable": sample_confusable_labels(logits, y_test, 1, 1, 1)}  # the classifier's top wrong label
    aurocs, hist = label_auroc(full, variants, x_test, y_test, wrong_sets, args.batch_size)
    table = ScoreTable(full, classifier, args.batch_size)
    test_frr = {n: float(table.detector(d)(x_test)[0].float().mean()) for n, d in variants.items()}
    x_ok, y_ok = correctly_classified(classifier, x_test, y_test)
    rows = attack_points(args, classifier, table, variants, x_ok, y_ok)

    result = {"dataset": ds, "split": args.split, "num_images": len(y_test), "correctly_classified": len(y_ok),
              "calibration_images": len(y_cal), "calibration_source": source, "target_frr": args.target_frr,
              "calibration": {n: d.calibration.as_dict() for n, d in variants.items()},
              "label_auroc": aurocs["random"], "label_auroc_confusable": aurocs["confusable"],
              "test_clean_frr": test_frr, "attacks": rows, "bundle": str(bundle),
              "seconds": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "contranet_eval.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "contranet_table.md", markdown_table(result))
    score_histograms(hist, variants["metric"].thresholds[0].item(), out / "label_scores.png", log=False,
                     xlabel="d(M(x), M(G(E(x), label)))", title=f"{ds}: ContraNet metric score on {result['split']} images")
    return result


def main(argv: list[str], data: Data) -> int:
    args = parse_args(argv, data)
    result = evaluate(args, data.load_images, data.load_calibration)
    print(markdown_table(result))
    print(f"wrote {Path(args.out or f'results/{args.dataset}/contranet')}/contranet_eval.json, contranet_table.md, "
          f"label_scores.png; detector bundle {result['bundle']}")
    return 0

"""The paper's evaluation of a detector bundle (§5.1–5.2, Figures 5–6): attacks × budgets → curves.

``mixdefense test --config experiments/<ds>/evaluate.yaml`` (``make evaluate DATASET=<ds>``).
Per test batch (images in ``[0, 1]``):

1. every layer of the bundle scores every clean image (:meth:`MixDefense.layer_table`): the
   clean rows give the clean accuracy with and without the defense and each layer's clean
   false rejection;
2. the images the classifier gets right are attacked with every configured attack:
   *budgeted* attacks at each ε of their grid (FGSM and FGM compute the loss gradient once
   and scale it for all budgets — the sign and the L2 direction of the gradient do not depend on
   ε; the iterative attacks run once per ε), *unbudgeted* ones (C&W, DeepFool) once, their AEs
   then binned by the measured perturbation (per norm: an AE lands in the first bin edge ≥
   its norm; beyond the last edge it is dropped);
3. each AE and its clean original are scored by every layer; one row per AE is kept
   (point, success, correct, norm, margins of the AE and of its original).

Rows are ``torchmetrics.CatMetric`` states, so under DDP every process attacks its shard and
the rows are gathered before the metrics are computed (the same numbers as one process).
At the end of the test epoch, per (attack, ε) and defense (each layer alone, and the
composite ``mixdefense``): Acc_detector (eq. 7), Acc_RC (eq. 8), detection rate, the clean
rejection on the originals, AUROC and TPR at 5 % FPR (score: the largest layer margin), and
which layer caught the successful AEs first; points with fewer than ``min_successes``
successful AEs are marked dropped (paper: 100).  Written to ``report_dir``:
``evaluation.json``, ``points.csv``, ``acc_detector.png`` (Figure 5), ``acc_rc.png``
(Figure 6), ``detection_rate.png``; the same table and curves go to W&B when it is a logger.

Budgets in the config: L∞ ones in units of 1/255, L2 ones over the whole image in ``[0, 1]``
pixel units.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import CatMetric

from mixdefense.attacks import get_attack, perturbation_norm, run_attack, run_sweep
from mixdefense.io import atomic_write_text
from mixdefense.metrics import acc_detector, acc_robust_classifier, detection_auroc, tpr_at_fpr
from mixdefense.pipeline import load_detector
from mixdefense.plots import budget_curves

LINF_UNIT = 255.0
COMPOSITE = "mixdefense"


def _points(attacks: dict[str, dict]) -> list[dict]:
    """The (attack, norm, ε) points of the sweep, ε in [0, 1] pixel units."""
    points = []
    for name, cfg in attacks.items():
        spec = get_attack(name)
        if spec.budgeted:
            budgets = cfg.get("budgets")
            if not budgets:
                raise ValueError(f"attack {name!r} needs a non-empty 'budgets' list")
            unit = LINF_UNIT if spec.norm == "linf" else 1.0
            points += [{"attack": name, "norm": spec.norm, "eps": b / unit, "binned": False} for b in sorted(budgets)]
        else:
            bins = cfg.get("bins") or {}
            if not bins or any(n not in ("l2", "linf") for n in bins):
                raise ValueError(f"attack {name!r} has no budget: give 'bins' per norm, e.g. {{l2: [0.5, 1.0]}}")
            for norm, edges in bins.items():
                unit = LINF_UNIT if norm == "linf" else 1.0
                points += [{"attack": name, "norm": norm, "eps": e / unit, "binned": True} for e in sorted(edges)]
    return points


class MixDefenseEvaluation(pl.LightningModule):
    """Budget sweeps of a detector bundle (see the module docstring).

    Args:
        bundle: the detector file (``mixdefense.load_detector``).
        attacks: ``{attack name: {budgets: [...]} | {bins: {norm: [...]}}, + attack keyword arguments}``.
        min_successes: points with fewer successful AEs are marked dropped.
        report_dir: where the JSON, CSV and figures go.
        title: figure title prefix (e.g. the dataset).
        examples: save this many clean images and, per attack, successful AEs (at its largest
            budget) as PNG files under ``report_dir/examples/`` (from the first batch).
    """

    def __init__(self, bundle: str, attacks: dict[str, dict[str, Any]], min_successes: int = 100,
                 report_dir: str = "results/mixdefense", title: str = "", examples: int = 0):
        super().__init__()
        if not Path(bundle).exists():
            raise FileNotFoundError(f"detector bundle not found: {bundle} (make it with `mixdefense bundle --dataset ...`)")
        self.save_hyperparameters()
        self.detector = load_detector(bundle).requires_grad_(False)
        self.points = _points(attacks)
        self.num_layers = len(self.detector.layers)
        self.ae_rows = CatMetric(nan_strategy="disable")  # [point, success, adv_correct, norm, adv margins (L), clean margins (L)]
        self.clean_rows = CatMetric(nan_strategy="disable")  # [correct, margins (L)]

    def _attack_kwargs(self, name: str) -> dict:
        return {k: v for k, v in self.hparams.attacks[name].items() if k not in ("budgets", "bins")}

    def test_step(self, batch, batch_idx):
        x, y = batch
        clf = self.detector.classifier
        labels, margins = self.detector.layer_table(x)
        self.clean_rows.update(torch.cat([(labels == y).float()[:, None], margins.T.float()], 1))
        ok = labels == y
        if not ok.any():
            return
        xa, ya, clean_m = x[ok], y[ok], margins[:, ok]
        save_examples = batch_idx == 0 and self.hparams.examples > 0 and self.trainer.is_global_zero
        if save_examples:
            self._save_pngs(xa[: self.hparams.examples], "clean")
        for name in self.hparams.attacks:
            ids = [i for i, p in enumerate(self.points) if p["attack"] == name]
            with torch.inference_mode(False), torch.enable_grad():
                xs, ys = xa.clone(), ya.clone()  # normal tensors: the attacks need autograd
                if get_attack(name).budgeted:
                    advs = run_sweep(name, clf, xs, ys, [self.points[i]["eps"] for i in ids], **self._attack_kwargs(name))
                else:
                    advs = [run_attack(name, clf, xs, ys, **self._attack_kwargs(name))]
            for k, adv in enumerate(advs):
                adv_labels, adv_m = self.detector.layer_table(adv)
                base = [(adv_labels != ya).float(), (adv_labels == ya).float()]
                if save_examples and k == len(advs) - 1:
                    self._save_pngs(adv[adv_labels != ya][: self.hparams.examples], name)
                if get_attack(name).budgeted:
                    i = ids[k]
                    norm = perturbation_norm(adv, xa, self.points[i]["norm"])
                    self._add_rows(torch.full_like(norm, float(i)), base, norm, adv_m, clean_m)
                    continue
                for norm_name in dict.fromkeys(self.points[i]["norm"] for i in ids):
                    bin_ids = [i for i in ids if self.points[i]["norm"] == norm_name]
                    edges = torch.tensor([self.points[i]["eps"] for i in bin_ids], device=adv.device)
                    norm = perturbation_norm(adv, xa, norm_name)
                    which = torch.searchsorted(edges, norm, side="left")  # first edge >= norm
                    keep = which < len(bin_ids)
                    point = torch.tensor(bin_ids, device=adv.device, dtype=torch.float)[which.clamp_max(len(bin_ids) - 1)]
                    self._add_rows(point[keep], [b[keep] for b in base], norm[keep], adv_m[:, keep], clean_m[:, keep])

    def _save_pngs(self, images: torch.Tensor, folder: str) -> None:
        import torchvision

        out = Path(self.hparams.report_dir) / "examples" / folder
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            torchvision.utils.save_image(img, out / f"{i:02d}.png")

    def _add_rows(self, point, base, norm, adv_m, clean_m):
        if point.numel():
            self.ae_rows.update(torch.cat([point[:, None], *[b[:, None] for b in base], norm[:, None],
                                           adv_m.T.float(), clean_m.T.float()], 1))

    def on_test_epoch_end(self):
        ae = _as_table(self.ae_rows, 4 + 2 * self.num_layers)
        clean = _as_table(self.clean_rows, 1 + self.num_layers)
        self.ae_rows.reset()
        self.clean_rows.reset()
        result = summarize(ae, clean, self.points, self.detector.layer_names, self.hparams.min_successes)
        result["bundle"] = self.hparams.bundle
        self.log_dict({"clean/accuracy": result["clean"]["accuracy_classifier"],
                       "clean/accuracy_with_defense": result["clean"]["accuracy_with_defense"]}, sync_dist=False)
        if self.trainer.is_global_zero:
            write_report(result, Path(self.hparams.report_dir), self.hparams.title)
            self._log_wandb(result)
            print(format_table(result))
            print(f"wrote {self.hparams.report_dir}/evaluation.json, points.csv, acc_detector.png, acc_rc.png, "
                  "detection_rate.png")

    def _log_wandb(self, result: dict) -> None:
        for logger in self.loggers:
            if type(logger).__name__ != "WandbLogger":
                continue
            rows = result["points"]
            columns = list(rows[0]) if rows else []
            logger.log_table("eval/points", columns=columns, data=[[r[c] for c in columns] for r in rows])
            import wandb

            for attack in dict.fromkeys(r["attack"] for r in rows):
                for metric in ("acc_detector", "acc_rc", "detection_rate"):
                    series = {}
                    for r in rows:
                        if r["attack"] == attack and r["kept"]:
                            series.setdefault(r["defense"], []).append((r["eps"], r[metric]))
                    if series:
                        keys = list(series)
                        xs = [[p[0] for p in series[k]] for k in keys]
                        ys = [[p[1] for p in series[k]] for k in keys]
                        logger.experiment.log({f"curves/{attack}/{metric}": wandb.plot.line_series(
                            xs=xs, ys=ys, keys=keys, title=f"{attack}: {metric}", xname="ε ([0, 1] pixel units)")})


def _as_table(metric: CatMetric, width: int) -> torch.Tensor:
    try:
        t = metric.compute()
    except Exception:  # nothing was updated (CatMetric warns / raises on an empty state)
        return torch.empty(0, width)
    t = t.detach().cpu().float()
    return t.view(-1, width) if t.numel() else torch.empty(0, width)


def summarize(ae: torch.Tensor, clean: torch.Tensor, points: list[dict], layer_names: list[str],
              min_successes: int) -> dict:
    """Every metric from the gathered rows (see :class:`MixDefenseEvaluation`)."""
    n_layers = len(layer_names)
    defenses = {name: [i] for i, name in enumerate(layer_names)}
    defenses[COMPOSITE] = list(range(n_layers))
    correct, clean_m = clean[:, 0].bool(), clean[:, 1:]
    clean_summary = {"images": int(len(clean)), "accuracy_classifier": float(correct.float().mean()) if len(clean) else math.nan}
    rejected_all = (clean_m > 1).any(1)
    clean_summary["accuracy_with_defense"] = float((correct & ~rejected_all).float().mean()) if len(clean) else math.nan
    clean_summary["false_rejection"] = {d: float((clean_m[:, idx] > 1).any(1).float().mean()) if len(clean) else math.nan
                                        for d, idx in defenses.items()}
    rows = []
    for pid, p in enumerate(points):
        sel = ae[ae[:, 0] == pid] if len(ae) else ae
        success, correct_adv, norm = sel[:, 1].bool(), sel[:, 2].bool(), sel[:, 3]
        adv_m, cl_m = sel[:, 4:4 + n_layers], sel[:, 4 + n_layers:]
        n, n_succ = len(sel), int(success.sum())
        for d, idx in defenses.items():
            adv_score, clean_score = adv_m[:, idx].amax(1), cl_m[:, idx].amax(1)
            adv_rej, clean_rej = adv_score > 1, clean_score > 1
            r = {"attack": p["attack"], "norm": p["norm"], "eps": p["eps"], "binned": p["binned"], "defense": d,
                 "num_aes": n, "num_successful": n_succ, "attack_success_rate": n_succ / n if n else math.nan,
                 "kept": n_succ >= min_successes, "detection_rate": math.nan, "clean_rejection_rate": math.nan,
                 "acc_detector": math.nan, "acc_rc": acc_robust_classifier(adv_rej, correct_adv) if n else math.nan,
                 "auroc": math.nan, "tpr_at_5fpr": math.nan,
                 "mean_norm": float(norm[success].mean()) if n_succ else math.nan}
            if n_succ:
                s = success
                r.update(detection_rate=float(adv_rej[s].float().mean()), clean_rejection_rate=float(clean_rej[s].float().mean()),
                         acc_detector=acc_detector(clean_rej[s], adv_rej[s]),
                         auroc=detection_auroc(clean_score[s], adv_score[s]),
                         tpr_at_5fpr=tpr_at_fpr(clean_score[s], adv_score[s], 0.05))
                if d == COMPOSITE:
                    first = torch.where((adv_m[s] > 1).any(1), (adv_m[s] > 1).int().argmax(1), torch.full((n_succ,), -1))
                    for i, name in enumerate(layer_names):
                        r[f"caught_by_{name}"] = float((first == i).float().mean())
            rows.append(r)
    return {"clean": clean_summary, "layers": layer_names, "min_successes": min_successes, "points": rows}


def format_table(result: dict) -> str:
    """The composite's points as a text table (attack, ε, attack success, Acc_detector, Acc_RC, catches)."""
    c = result["clean"]
    fr = ", ".join(f"{k} {100 * v:.1f} %" for k, v in c["false_rejection"].items())
    lines = [f"clean ({c['images']} test images): accuracy {100 * c['accuracy_classifier']:.1f} % without the defense, "
             f"{100 * c['accuracy_with_defense']:.1f} % with it (rejections count as errors); false rejection: {fr}",
             "", f"{'attack':<16} {'eps':>9} {'AEs':>5} {'success':>8} {'Acc_det':>8} {'Acc_RC':>7} {'AUROC':>6}  caught by",]
    for r in result["points"]:
        if r["defense"] != COMPOSITE:
            continue
        eps = f"{r['eps'] * 255:.0f}/255" if r["norm"] == "linf" else f"{r['eps']:.2f}"
        if r["binned"]:
            eps = "≤" + eps
        caught = ", ".join(f"{k[len('caught_by_'):]} {100 * v:.0f} %" for k, v in r.items() if k.startswith("caught_by_"))
        flag = "" if r["kept"] else f"  (dropped: {r['num_successful']} successful AEs < {result['min_successes']})"
        pct = lambda v: "   —" if v != v else f"{100 * v:.1f}"  # noqa: E731
        auroc = "  —" if r["auroc"] != r["auroc"] else f"{r['auroc']:.3f}"
        name = f"{r['attack']} ({r['norm']})" if r["binned"] else r["attack"]
        lines.append(f"{name:<16} {eps:>9} {r['num_aes']:>5} {pct(r['attack_success_rate']):>8} "
                     f"{pct(r['acc_detector']):>8} {pct(r['acc_rc']):>7} {auroc:>6}  {caught}{flag}")
    return "\n".join(lines)


def write_report(result: dict, out: Path, title: str = "") -> None:
    """``evaluation.json``, ``points.csv`` and the Figure-5/6-style PNGs."""
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
    curve_rows = [{**r, "attack": f"{r['attack']} ({r['norm']})" if r["binned"] else r["attack"]} for r in rows]
    for metric in ("acc_detector", "acc_rc", "detection_rate"):
        budget_curves(curve_rows, out / f"{metric}.png", metrics=(metric,), title=f"{title} {metric}".strip())

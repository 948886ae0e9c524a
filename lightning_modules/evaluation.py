"""The paper's evaluation of a detector bundle (§5.1–5.2, Figures 5–6): attacks × budgets → curves.

``mixdefense test --config experiments/<ds>/evaluate.yaml`` (``make evaluate DATASET=<ds>``).
Per test batch (images in ``[0, 1]``):

1. every layer of the bundle scores every clean image (:meth:`MixDefense.layer_table`): the
   clean rows give the clean accuracy with and without the defense and each layer's clean
   false rejection;
2. the images the classifier gets right are attacked with every configured attack:
   *budgeted* attacks at each ε of their grid (FGSM and FGM compute the loss gradient once
   and scale it for all budgets — the sign and the L2 direction of the gradient do not depend on
   ε; the iterative attacks run once per ε), *minimum-norm* ones (C&W, DeepFool) once, their AEs
   then placed on the budgets of their norm cumulatively: at budget ε an image is attacked
   successfully iff its minimal AE fools the classifier with norm ≤ ε; otherwise its row at ε is
   the clean image (the attacker has nothing within ε), so every budget counts every image;
3. each AE is scored by every layer; one row per image and point is kept (point, success,
   correct, norm, margins of the AE).

Rows are ``torchmetrics.CatMetric`` states, so under DDP every process attacks its shard and
the rows are gathered before the metrics are computed (the same numbers as one process).
**Operating points.**  Before the first batch, every layer and detector baseline scores the
clean calibration images the bundle was calibrated on (its record names the split:
``mixdefense.splits``), and only the *correctly classified* ones set, for every rate of ``frrs``
(default 1 % and 5 %), each detector's cut-off (:func:`mixdefense.calibration.margin_cutoffs`):
each layer alone, Feature Squeezing and MagNet at that rate; the composite keeps SAEC's deployed
threshold and gives ContraNet what is left, so that together they reject that rate.  Every
compared detector thus pays the same clean cost, and detection rates use those deployed
thresholds only.

At the end of the test epoch, per (attack, ε), defense (each layer alone, and the composite
``mixdefense``) and operating point: Acc_detector (eq. 7: the mean of the clean acceptance on the
fixed clean set — the correctly classified clean test images — and the detection rate), Acc_RC
(eq. 8), detection rate, AUROC against the fixed clean set, and which layer caught the successful
AEs first, every rate with its 95 % interval; per defense and operating point the clean false
rejection and how many *misclassified* clean images it rejects (a catch, not a cost).  Points with
fewer than ``min_successes`` successful AEs are marked sparse (``kept`` False) and still reported
and drawn, with their wider interval (paper: dropped below 100).  Written to ``report_dir``:
``evaluation.json``, ``points.csv``, per operating point ``acc_detector_frr1.png`` (Figure 5),
``acc_rc_frr1.png`` (Figure 6), ``detection_rate_frr1.png`` (…``_frr5``); the same table and
curves go to W&B when it is a logger.

Baselines (``baselines: {name: file}``, :mod:`mixdefense.evaluation.baselines`): detector
baselines (Feature Squeezing, MagNet) score the *same* AEs and clean originals as the bundle's
layers, with their own output label (MagNet: the classifier's label on the reformed input);
robust classifiers (Madry) are attacked white-box with the same attacks, budgets and test
images (the images *they* classify correctly).  The undefended classifier is a defense that
never rejects.  ``compare_acc_detector_frr1.png`` and ``compare_acc_rc_frr1.png`` (and ``_frr5``) put them on the
same panels as the composite, like the paper's Figures 5 and 6; ``comparison.md`` tabulates them.

Resume and reproducibility: every test batch draws its random numbers from
``torch.manual_seed(seed + batch index)`` (PGD's random start), so a batch's AEs do not depend
on the batches before it.  Its rows are written (atomically) as soon as they are done, in two
kinds of parts: the bundle's (its classifier attacked, every layer and detector baseline scoring
the AEs) and one per robust classifier (attacked on its own, seeded the same way).  Each part is
keyed by what it depends on (settings, the contents of its files — not their paths or baseline
names — and the batch), so a killed run started again with the same config computes only what is
missing, a bundle copied elsewhere (``make ship``) keeps its parts, and a run that adds a robust
classifier (``make compare`` after ``make evaluate``, both with ``partial_dir`` set to the same
folder) reuses the bundle's parts and attacks only the new classifier.  The default folder,
``report_dir/partial/``, is removed once the report is written; a ``partial_dir`` given in the
config is kept (``resume: false`` recomputes everything).

Budgets in the config: L∞ ones in units of 1/255, L2 ones over the whole image in ``[0, 1]``
pixel units.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import CatMetric
from tqdm.auto import tqdm

from mixdefense.attacks import ChannelsLast, get_attack, perturbation_norm, run_attack, run_sweep
from mixdefense.calibration import margin_cutoffs
from mixdefense.evaluation.baselines import load_baseline
from mixdefense.evaluation.sweep import (
    BASELINE_WIDTH,
    COMPOSITE,
    UNDEFENDED,
    baseline_table,
    comparison_table,
    format_table,
    frr_tag,
    summarize,
    write_report,
)
from mixdefense.io import atomic_torch_save
from mixdefense.pipeline import load_detector
from mixdefense.splits import check_disjoint_from_calibration, indices_digest

LINF_UNIT = 255.0


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
            points += [{"attack": name, "norm": spec.norm, "eps": b / unit, "minimum_norm": False} for b in sorted(budgets)]
        else:
            bins = cfg.get("bins") or {}
            if not bins or any(n not in ("l2", "linf") for n in bins):
                raise ValueError(f"attack {name!r} has no budget: give 'bins' per norm, e.g. {{l2: [0.5, 1.0]}}")
            for norm, edges in bins.items():
                unit = LINF_UNIT if norm == "linf" else 1.0
                points += [{"attack": name, "norm": norm, "eps": e / unit, "minimum_norm": True} for e in sorted(edges)]
    return points


class MixDefenseEvaluation(pl.LightningModule):
    """Budget sweeps of a detector bundle (see the module docstring).

    Args:
        bundle: the detector file (``mixdefense.load_detector``).
        attacks: ``{attack name: {budgets: [...]} | {bins: {norm: [...]}}, + attack keyword arguments}``.
        min_successes: points with fewer successful AEs are marked sparse (reported, drawn hollow).
        report_dir: where the JSON, CSV and figures go.
        title: figure title prefix (e.g. the dataset).
        examples: save this many clean images and, per attack, successful AEs (at its largest
            budget) as PNG files under ``report_dir/examples/`` (from the first batch).
        baselines: ``{name: file}`` of compared defenses (:func:`mixdefense.evaluation.baselines.load_baseline`:
            Feature Squeezing / MagNet files, or a robust classifier file such as ``madry.pt``).
        seed: base of the per-batch seeds (batch ``i`` uses ``seed + i``).
        resume: reuse the finished batches of a killed run with the same settings.
        frrs: the operating points: clean false-rejection rates every detector is reported at.
        calibration_images: how many images of the bundle's calibration split set the cut-offs
            (the correctly classified ones among them).
        partial_dir: where finished batch parts go (default ``report_dir/partial``, removed at the end);
            runs that share it share their parts (see the module docstring), and it is kept.
        channels_last: attack the classifiers in channels-last memory format (the same numbers up to
            float rounding; ~20 % faster convolutions on a CPU).
    """

    def __init__(self, bundle: str, attacks: dict[str, dict[str, Any]], min_successes: int = 100,
                 report_dir: str = "results/mixdefense", title: str = "", examples: int = 0,
                 baselines: dict[str, str] | None = None, seed: int = 0, resume: bool = True,
                 frrs: list[float] | None = None, calibration_images: int = 2000, partial_dir: str | None = None,
                 channels_last: bool = True):
        super().__init__()
        if not Path(bundle).exists():
            raise FileNotFoundError(f"detector bundle not found: {bundle} (make it with `mixdefense bundle --dataset ...`)")
        self.save_hyperparameters()
        self.detector = load_detector(bundle).requires_grad_(False)
        self.points = _points(attacks)
        self.num_layers = len(self.detector.layers)
        reserved = {*self.detector.layer_names, COMPOSITE, UNDEFENDED}
        clash = reserved & set(baselines or {})
        if clash:
            raise ValueError(f"baseline names {sorted(clash)} clash with the bundle's defenses {sorted(reserved)}")
        self.baselines = [load_baseline(n, f, self.detector.classifier) for n, f in (baselines or {}).items()]
        for b in self.baselines:
            if b.attack_model is not None:
                b.attack_model.requires_grad_(False)
        # the contents (not the dates) of the bundle and baseline files: partial rows survive a git clone
        self._file_digests = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest()
                              for f in [bundle, *(baselines or {}).values()]}
        same = {}
        for name, f in (baselines or {}).items():
            same.setdefault(self._file_digests[f], []).append(name)
        twins = [names for names in same.values() if len(names) > 1]
        if twins:  # parts map their baseline columns by content: two names for one file would be ambiguous
            raise ValueError(f"baselines {twins} are the same file content under different names: keep one")
        frrs = [0.01, 0.05] if frrs is None else list(frrs)
        if not frrs or any(not 0.0 < f < 1.0 for f in frrs):
            raise ValueError(f"frrs must be a non-empty list of rates in (0, 1), got {frrs}")
        self.frrs = [float(f) for f in frrs]
        self.cutoffs: dict[float, dict[str, torch.Tensor]] = {}
        self.calibration: dict = {}
        self.ae_rows = CatMetric(nan_strategy="disable")  # [point, success, adv_correct, norm, adv margins (L)]
        self.clean_rows = CatMetric(nan_strategy="disable")  # [correct, margins (L)]
        self.baseline_rows = CatMetric(nan_strategy="disable")  # BASELINE_WIDTH columns
        self.baseline_clean_rows = CatMetric(nan_strategy="disable")  # [baseline, correct, margin]

    def on_test_start(self) -> None:
        """Refuse test images the bundle was calibrated on, then set every detector's cut-offs."""
        dm = getattr(self.trainer, "datamodule", None)
        record = getattr(self.detector, "record", {}).get("contranet_calibration", {})
        if dm is None or not hasattr(dm, "calibration_data"):
            raise RuntimeError("the evaluation needs a datamodule with calibration_data() (datamodules.ImageDataModule)")
        check_disjoint_from_calibration(record, dm.split_indices["test"])
        self.set_cutoffs(*dm.calibration_data(record.get("split", "val"), self.hparams.calibration_images)[:2])

    @torch.no_grad()
    def set_cutoffs(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> None:
        """Cut-offs of every detector at every rate of ``frrs`` from clean calibration images ``(x, y)``
        (only the correctly classified ones count; :func:`mixdefense.calibration.margin_cutoffs`)."""
        labels, margins, base = [], [], {b.name: [] for b in self.baselines if b.attack_model is None}
        for xb in x.split(batch_size):
            xb = xb.to(self.device)
            lab, m = self.detector.layer_table(xb)
            labels.append(lab.cpu())
            margins.append(m.T.cpu().float())
            for b in self.baselines:
                if b.attack_model is None:
                    base[b.name].append(b.labels_and_margins(xb)[1].cpu().float())
        ok = torch.cat(labels) == y.cpu()
        m = torch.cat(margins)[ok]
        names = self.detector.layer_names
        self.calibration = {"images": len(y), "correctly_classified": int(ok.sum()), "misclassified": int((~ok).sum()),
                            "split": getattr(self.detector, "record", {}).get("contranet_calibration", {}).get("split", "val")}
        for frr in self.frrs:
            cuts = {name: margin_cutoffs(m[:, [i]], frr) for i, name in enumerate(names)}
            cuts[COMPOSITE] = margin_cutoffs(m, frr, fixed=len(names) - 1)
            cuts.update({name: margin_cutoffs(torch.cat(v)[ok][:, None], frr) for name, v in base.items()})
            self.cutoffs[float(frr)] = cuts

    def _attack_kwargs(self, name: str) -> dict:
        return {k: v for k, v in self.hparams.attacks[name].items() if k not in ("budgets", "bins")}

    def test_step(self, batch, batch_idx):
        x, y = batch
        data = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
        data.update(y.detach().cpu().contiguous().numpy().tobytes())
        files = self.hparams.baselines or {}
        digest = self._file_digests
        detectors = {b.name: files[b.name] for b in self.baselines if b.attack_model is None}
        parts = [("bundle", {"bundle": digest[self.hparams.bundle], "detector_baselines": sorted(digest[f] for f in detectors.values())},
                  {"bundle": self.hparams.bundle, "detector_baselines": detectors}, [self.hparams.bundle, *detectors.values()],
                  lambda rows: self._attack_batch(x, y, batch_idx, rows))]
        for b, baseline in enumerate(self.baselines):
            if baseline.attack_model is not None:
                f = files[baseline.name]
                parts.append((f"robust-{baseline.name}", {"robust": digest[f]}, {"robust": {baseline.name: f}}, [f],
                              lambda rows, b=b, baseline=baseline: self._attack_robust(b, baseline, x, y, rows)))
        for part, settings, legacy_settings, used, compute in parts:
            signature = self._signature(settings, data.hexdigest())
            path = self._partial_path(batch_idx, f"{part.split('-')[0]}_{signature[:16]}")  # runs sharing the folder never collide
            tables = self._load_part(path, signature) if self.hparams.resume else None
            if tables is None and self.hparams.resume:
                tables = self._upgrade_legacy_part(batch_idx, part, legacy_settings, used, data.hexdigest(), path, signature)
            if tables is None:
                torch.manual_seed(self.hparams.seed + batch_idx)
                rows: dict[str, list[torch.Tensor]] = {key: [] for key in self._metrics()}
                compute(rows)
                tables = {k: torch.cat(v).detach() if v else torch.empty(0) for k, v in rows.items()}
                self._save_part(path, signature, tables)
            for key, metric in self._metrics().items():
                if tables[key].numel():
                    metric.update(tables[key].to(self.device))

    def _baseline_digests(self) -> list[str]:
        files = self.hparams.baselines or {}
        return [self._file_digests[files[b.name]] for b in self.baselines]

    def _save_part(self, path: Path, signature: str, tables: dict[str, torch.Tensor]) -> None:
        """A finished part: its rows, and the contents (sha256) of the baselines its baseline columns number."""
        atomic_torch_save({"signature": signature, "baseline_digests": self._baseline_digests(),
                           "baseline_names": [b.name for b in self.baselines],
                           **{k: t.cpu() for k, t in tables.items()}}, path)

    def _load_part(self, path: Path, signature: str) -> dict[str, torch.Tensor] | None:
        """A finished part's tables, its baseline columns renumbered to this run's baselines (``None``: redo it).

        Columns are matched by the baselines' file contents, so a part written under other file names or
        baseline names is reused (parts of the legacy format, which has no digests, are matched by name)."""
        if not path.exists():
            return None
        done = torch.load(path, map_location="cpu", weights_only=True)
        if done.get("signature") != signature:
            return None
        if "baseline_digests" in done:
            index = {d: float(i) for i, d in enumerate(self._baseline_digests())}
            keys = done["baseline_digests"]
        else:
            index = {b.name: float(i) for i, b in enumerate(self.baselines)}
            keys = done.get("baseline_names", [])
        renumber = torch.tensor([index.get(n, -1.0) for n in keys] or [-1.0])
        tables = {k: done[k].clone() for k in self._metrics()}
        for key, col in (("baseline", 1), ("baseline_clean", 0)):
            if tables[key].numel():
                tables[key][:, col] = renumber[tables[key][:, col].long()]
                tables[key] = tables[key][tables[key][:, col] >= 0]  # rows of baselines this run does not have
        return tables

    def _metrics(self) -> dict[str, CatMetric]:
        return {"ae": self.ae_rows, "clean": self.clean_rows, "baseline": self.baseline_rows, "baseline_clean": self.baseline_clean_rows}

    def _signature(self, settings: dict, data: str) -> str:
        """What a part's rows depend on (the attacks, the seed, the part's own settings, in which files are
        named by their contents, not their paths, and the batch): rows of another run or another data split
        are never reused, and a bundle copied elsewhere (``make ship``) or a baseline renamed keeps its rows.
        Not the operating points: rows hold margins, and the cut-offs are applied when the report is made."""
        h = hashlib.sha256(json.dumps({"parts": "content-keyed", "attacks": self.hparams.attacks,
                                       "seed": self.hparams.seed, **settings}, sort_keys=True, default=str).encode())
        h.update(data.encode())
        return h.hexdigest()

    def _legacy_signature(self, settings: dict, files: list[str], data: str) -> str:
        """The key of parts written before parts were keyed by content (file paths and names in the key)."""
        h = hashlib.sha256(json.dumps({"attacks": self.hparams.attacks, "seed": self.hparams.seed, **settings},
                                      sort_keys=True, default=str).encode())
        for f in files:
            h.update(self._file_digests[f].encode())
        h.update(data.encode())
        return h.hexdigest()

    def _upgrade_legacy_part(self, batch_idx: int, part: str, settings: dict, files: list[str], data: str,
                             path: Path, signature: str) -> dict[str, torch.Tensor] | None:
        """A part of the legacy format (same paths, names and contents) rewritten under its content key."""
        legacy = self._legacy_signature(settings, files, data)
        old = self._partial_path(batch_idx, f"{part}_{legacy[:16]}")
        tables = self._load_part(old, legacy)
        if tables is not None:
            self._save_part(path, signature, tables)
            old.unlink()
        return tables

    @property
    def _partial_root(self) -> Path:
        return Path(self.hparams.partial_dir or Path(self.hparams.report_dir) / "partial")

    def _partial_path(self, batch_idx: int, part: str) -> Path:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return self._partial_root / f"rank{rank}of{world}_batch{batch_idx:05d}_{part}.pt"

    def _attack_progress(self, names, desc: str):
        quiet = not self.trainer.is_global_zero or self.trainer.progress_bar_callback is None
        return tqdm(names, desc=desc, leave=False, disable=quiet)

    def _attack_batch(self, x, y, batch_idx, rows):
        """The bundle's classifier attacked; every layer and detector baseline scores the AEs."""
        clf = self.detector.classifier
        labels, margins = self.detector.layer_table(x)
        rows["clean"].append(torch.cat([(labels == y).float()[:, None], margins.T.float()], 1))
        detectors = [(b, d) for b, d in enumerate(self.baselines) if d.attack_model is None]
        ok = labels == y
        clean_b, clean_b_correct = {}, {}  # each detector baseline's clean margins / right labels, scored once
        for b, det in detectors:
            b_labels, b_margin = det.labels_and_margins(x)
            rows["baseline_clean"].append(torch.stack([torch.full_like(b_margin, b), (b_labels == y).float(), b_margin.float()], 1))
            clean_b[b], clean_b_correct[b] = b_margin[ok], (b_labels == y).float()[ok]
        if not ok.any():
            return
        xa, ya, clean_m = x[ok], y[ok], margins[:, ok]
        save_examples = batch_idx == 0 and self.hparams.examples > 0 and self.trainer.is_global_zero
        if save_examples:
            self._save_pngs(xa[: self.hparams.examples], "clean")
        for name in self._attack_progress(self.hparams.attacks, f"batch {batch_idx}: attacks"):
            ids = [i for i, p in enumerate(self.points) if p["attack"] == name]
            advs = self._make_aes(name, clf, xa, ya, ids)
            for k, adv in enumerate(advs):
                adv_labels, adv_m = self.detector.layer_table(adv)
                success, correct = (adv_labels != ya).float(), (adv_labels == ya).float()
                if save_examples and k == len(advs) - 1:
                    self._save_pngs(adv[adv_labels != ya][: self.hparams.examples], name)
                scored = {b: det.labels_and_margins(adv) for b, det in detectors}
                for point, within, norm in self._assign_points(name, ids, k, adv, xa):
                    # outside the budget the attacker has no AE: the row is the clean image (correct, clean margins)
                    s_i, c_i = success * within, torch.where(within, correct, torch.ones_like(correct))
                    n_i, m_i = torch.where(within, norm, torch.zeros_like(norm)), torch.where(within[None], adv_m, clean_m)
                    rows["ae"].append(torch.cat([point[:, None], s_i[:, None], c_i[:, None], n_i[:, None], m_i.T.float()], 1))
                    for b, (b_labels, b_margin) in scored.items():
                        b_correct = torch.where(within, (b_labels == ya).float(), clean_b_correct[b])
                        rows["baseline"].append(baseline_table(point, b, s_i, b_correct, n_i,
                                                                torch.where(within, b_margin, clean_b[b])))

    def _attack_robust(self, b: int, baseline, x, y, rows):
        """A robust classifier attacked white-box on the test images it gets right (Acc_RC only)."""
        model = baseline.attack_model
        labels, _ = baseline.labels_and_margins(x)
        zeros = torch.zeros_like(labels, dtype=torch.float)
        rows["baseline_clean"].append(torch.stack([zeros + b, (labels == y).float(), zeros], 1))
        ok = labels == y
        if not ok.any():
            return
        xa, ya = x[ok], y[ok]
        for name in self._attack_progress(self.hparams.attacks, f"{baseline.name}: attacks"):
            ids = [i for i, p in enumerate(self.points) if p["attack"] == name]
            for k, adv in enumerate(self._make_aes(name, model, xa, ya, ids)):
                adv_labels, _ = baseline.labels_and_margins(adv)
                success, correct = (adv_labels != ya).float(), (adv_labels == ya).float()
                for point, within, norm in self._assign_points(name, ids, k, adv, xa):
                    z = torch.zeros_like(norm)
                    rows["baseline"].append(baseline_table(point, b, success * within,
                                                            torch.where(within, correct, torch.ones_like(correct)),
                                                            torch.where(within, norm, z), z))

    def _make_aes(self, name, model, xa, ya, ids) -> list[torch.Tensor]:
        model = ChannelsLast(model) if self.hparams.channels_last else model
        with torch.inference_mode(False), torch.enable_grad():
            xs, ys = xa.clone(), ya.clone()  # normal tensors: the attacks need autograd
            if get_attack(name).budgeted:
                return run_sweep(name, model, xs, ys, [self.points[i]["eps"] for i in ids], **self._attack_kwargs(name))
            return [run_attack(name, model, xs, ys, **self._attack_kwargs(name))]

    def _assign_points(self, name, ids, k, adv, xa):
        """``(point ids [B], within budget [B], norms [B])`` per point of the ``k``-th AE batch of attack
        ``name``: a budgeted attack's batch is one point (every AE within its budget); a minimum-norm
        attack's batch gives every budget of its norm, cumulatively: at budget ε an AE counts iff its
        measured norm is ≤ ε (a relative tolerance of 1e-6 absorbs float rounding)."""
        if get_attack(name).budgeted:
            i = ids[k]
            norm = perturbation_norm(adv, xa, self.points[i]["norm"])
            yield torch.full_like(norm, float(i)), torch.ones_like(norm, dtype=torch.bool), norm
            return
        for i in ids:
            norm = perturbation_norm(adv, xa, self.points[i]["norm"])
            yield torch.full_like(norm, float(i)), norm <= self.points[i]["eps"] * (1 + 1e-6), norm

    def _save_pngs(self, images: torch.Tensor, folder: str) -> None:
        import torchvision

        out = Path(self.hparams.report_dir) / "examples" / folder
        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            torchvision.utils.save_image(img, out / f"{i:02d}.png")

    def on_test_epoch_end(self):
        ae = _as_table(self.ae_rows, 4 + self.num_layers)
        clean = _as_table(self.clean_rows, 1 + self.num_layers)
        base = _as_table(self.baseline_rows, BASELINE_WIDTH)
        base_clean = _as_table(self.baseline_clean_rows, 3)
        for metric in self._metrics().values():
            metric.reset()
        if not self.cutoffs:
            raise RuntimeError("no cut-offs: on_test_start did not run (set_cutoffs(x, y) sets them by hand)")
        result = summarize(ae, clean, self.points, self.detector.layer_names, self.hparams.min_successes,
                           cutoffs=self.cutoffs, baselines=[b.name for b in self.baselines], baseline_rows=base,
                           baseline_clean=base_clean, robust=[b.name for b in self.baselines if b.attack_model is not None])
        result["bundle"] = self.hparams.bundle
        result["baseline_files"] = dict(self.hparams.baselines or {})
        result["calibration"] = {**self.calibration, "cutoffs": {str(f): {d: c.tolist() for d, c in cuts.items()}
                                                                 for f, cuts in self.cutoffs.items()}}
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and "test" in getattr(dm, "split_indices", {}):
            idx = dm.split_indices["test"]
            result["test_images"] = {"split": dm.test_split, "count": len(idx), "first": int(idx[0]), "last": int(idx[-1]),
                                     "indices_sha256": indices_digest(idx)}
        first_op = str(self.frrs[0])
        self.log_dict({"clean/accuracy": result["clean"]["accuracy_classifier"],
                       "clean/accuracy_with_defense": result["clean"]["operating_points"][first_op][COMPOSITE]["accuracy"]},
                      sync_dist=False)
        if self.trainer.is_global_zero:
            write_report(result, Path(self.hparams.report_dir), self.hparams.title)
            self._log_wandb(result)
            print("\n" + format_table(result))
            for frr in self.cutoffs if self.baselines else ():
                print("\n" + comparison_table(result, frr))
            tags = ", ".join(frr_tag(f) for f in self.cutoffs)
            print(f"wrote {self.hparams.report_dir}/evaluation.json, points.csv, acc_detector_*.png, acc_rc_*.png, "
                  f"detection_rate_*.png" + (", compare_*.png, comparison.md" if self.baselines else "") + f" ({tags})")
            # every process wrote its batches before the rows were gathered: the run is complete
            if not self.hparams.partial_dir:  # a folder named in the config is shared with other runs: kept
                shutil.rmtree(self._partial_root, ignore_errors=True)

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
                            series.setdefault(f"{r['defense']} @{frr_tag(r['frr_target'])}", []).append((r["eps"], r[metric]))
                    if series:
                        keys = list(series)
                        xs = [[p[0] for p in series[k]] for k in keys]
                        ys = [[p[1] for p in series[k]] for k in keys]
                        logger.experiment.log({f"curves/{attack}/{metric}": wandb.plot.line_series(
                            xs=xs, ys=ys, keys=keys, title=f"{attack}: {metric}", xname="ε ([0, 1] pixel units)")})


def _as_table(metric: CatMetric, width: int) -> torch.Tensor:
    """The gathered rows ``[n, width]`` (every process calls ``compute``: it is a collective under DDP)."""
    try:
        with warnings.catch_warnings():  # a table nobody updated (e.g. no baselines) is empty, not a problem
            warnings.filterwarnings("ignore", message=r".*was called before the ``update`` method.*")
            t = metric.compute()
    except Exception:  # nothing was updated (CatMetric raises on an empty state)
        return torch.empty(0, width)
    if not torch.is_tensor(t):  # never updated: an empty list
        return torch.empty(0, width)
    t = t.detach().cpu().float()
    return t.view(-1, width) if t.numel() else torch.empty(0, width)

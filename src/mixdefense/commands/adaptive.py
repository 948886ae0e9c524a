"""``mixdefense adaptive --dataset mnist|gtsrb [options]``: adaptive attacks on the whole MixDefense.

What it measures, on the first ``--num-images`` test images the classifier gets right, each
with a random wrong target label ``t`` (seeded), for every budget ``ε`` of ``--eps``
(L∞ by default, [0, 1] pixel units):

* ``pgd`` — non-adaptive targeted PGD on the classifier alone (``λ = μ = 0``, last iterate);
* ``adaptive`` — the full white-box attack :func:`mixdefense.attacks.adaptive.adaptive_pgd` with the
  ``(λ, μ)`` that fooled the whole pipeline most often in a sweep over ``--lambdas`` ×
  ``--mus`` on the first ``--sweep-images`` images (chosen per ε; the sweep is reported too);
* ``orthogonal`` (and ``selective`` when asked) — :func:`mixdefense.attacks.adaptive.orthogonal_pgd`;
* ``square`` and ``hopskipjump`` (when asked) — gradient-free attacks on the whole pipeline
  (:mod:`mixdefense.attacks.gradient_free`), the check that no gradient is masked (SAEC's
  histogram threshold, the ``argmax``): ``square`` is the score-based Square attack on the
  classifier's target margin plus a penalty per rejecting layer, run at every ε with
  ``--queries`` queries per image; ``hopskipjump`` is decision-based, on the accept-as-``t``
  oracle alone, started from loaded test images the pipeline accepts as ``t``, run once
  (minimum-norm, ``--queries`` per image): at ε an image is broken iff its AE has norm ``≤ ε``.

Every row names its attack ``family``, its ``threat_model`` and (gradient-free rows) its ``settings``.

Success rates (over all attacked images): against the classifier alone (``f(x_adv) = t``),
against each layer alone (``= t`` and that layer accepts), and against the whole MixDefense
(``= t`` and every layer accepts), always decided by the *real* layers.  ContraNet runs at
``--contranet-frr`` clean false rejection (default 5 %, Bryniarski et al.'s operating point;
recalibrated on the correctly classified ``--calibration-split`` images — the validation split, or a
test-set calibration split of :mod:`mixdefense.splits` — when the loaded detector uses another rate).

Then the paper's §6 case studies: (a) targeted FGSM on the cGAN's input (Figure 12) and
(b) FGSM / PGD on the latent ``z`` (Figure 13), with grids and numbers.

Writes ``<out>/{adaptive.json, adaptive.csv, success_vs_eps.png, figure12.png, figure13.png}``
(default ``results/<ds>/adaptive``), atomically.
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
import torch.nn.functional as F

from mixdefense.attacks import perturbation_norm
from mixdefense.attacks.adaptive import (
    PipelineObjective,
    adaptive_pgd,
    attack_latent,
    fgsm_on_cgan_input,
    orthogonal_pgd,
    reconstruction_distance,
    support_mask,
)
from mixdefense.attacks.gradient_free import PipelineQueries, hop_skip_jump, square_attack, within_budget
from mixdefense.calibration import calibration_record
from mixdefense.commands import Data, operating_point
from mixdefense.evaluation.curves import correctly_classified
from mixdefense.evaluation.plots import case_study_grid
from mixdefense.evaluation.reconstruction import resize_for
from mixdefense.io import atomic_write_text

LoadImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]

#: Per-dataset defaults (budgets in [0, 1] pixel units).  MNIST: the attacker perturbs only
#: the digit and a 2-px rim (SAEC's residuals stay exactly 0 on the flat background).
DEFAULTS = {
    "mnist": {"eps": [0.05, 0.1, 0.2, 0.3], "support_dilation": 2},
    "gtsrb": {"eps": [2 / 255, 4 / 255, 8 / 255, 16 / 255], "support_dilation": -1},
    "cifar10": {"eps": [2 / 255, 4 / 255, 8 / 255, 16 / 255], "support_dilation": -1},
}
CASE_EPS = [0.01, 0.03, 0.05, 0.1]  # §6 (a), paper: 0.01–0.1
LATENT_EPS = [0.05, 0.1, 0.2, 0.3]  # §6 (b), paper: 0.05–0.3
RATE_KEYS = ("classifier", "saec", "contranet", "mixdefense")
GRADIENT_FREE = ("square", "hopskipjump")
THREAT_MODELS = {
    "pgd": "non-adaptive (targeted PGD on the classifier alone)",
    "adaptive": "adaptive attacker (white-box, whole pipeline)",
    "orthogonal": "adaptive attacker (white-box, whole pipeline)",
    "selective": "adaptive attacker (white-box, whole pipeline)",
    "square": "adaptive attacker (gradient-free, whole pipeline)",
    "hopskipjump": "adaptive attacker (gradient-free, whole pipeline)",
}


def parse_args(argv: list[str], data: Data) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mixdefense adaptive", description=__doc__.split("\n\n")[0])
    data.add_dataset_argument(ap)
    ap.add_argument("--bundle", default=None, help="detector bundle (default artifacts/<ds>/detector.pt if present, "
                                                   "else assembled from artifacts/<ds>/{classifier,saec,contranet}.pt)")
    ap.add_argument("--out", default=None, help="report folder (default results/<ds>/adaptive)")
    ap.add_argument("--num-images", type=int, default=500, help="correctly classified test images attacked")
    ap.add_argument("--sweep-images", type=int, default=100, help="images of the (λ, μ) sweep (the first ones)")
    ap.add_argument("--eps", type=float, nargs="+", default=None, help="budgets, [0, 1] pixel units (default per dataset)")
    ap.add_argument("--norm", choices=["linf", "l2"], default="linf")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps (all attacks; step 2.5·ε/steps)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="ContraNet weights λ of the sweep")
    ap.add_argument("--mus", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="SAEC-surrogate weights μ of the sweep")
    ap.add_argument("--kappa", type=float, default=0.1, help="hinge offset on log margins")
    ap.add_argument("--temperature", type=float, default=0.05, help="SoftSAEC edge width, fraction of a bin")
    ap.add_argument("--support-dilation", type=int, default=None,
                    help="adaptive attacks perturb only pixels within this many px of non-zero content (-1: everywhere; default per dataset)")
    ap.add_argument("--attacks", nargs="+", default=["pgd", "adaptive", "orthogonal"],
                    choices=["pgd", "adaptive", "orthogonal", "selective", *GRADIENT_FREE])
    ap.add_argument("--queries", type=int, default=1000, help="gradient-free attacks: queries per image (square: per ε and restart)")
    ap.add_argument("--restarts", type=int, default=1, help="square: restarts")
    ap.add_argument("--square-p-init", type=float, default=0.8, help="square: initial fraction of the image a square covers")
    ap.add_argument("--square-lam", type=float, default=1.0, help="square: weight of the rejecting layers' penalty (hinge at --kappa)")
    ap.add_argument("--hsj-candidates", type=int, default=200,
                    help="hopskipjump: nearest loaded test images tried as starts per image (queries of the budget)")
    ap.add_argument("--contranet-frr", type=float, default=0.05, help="ContraNet's clean false-rejection rate (recalibrated if needed)")
    ap.add_argument("--calibration-images", type=int, default=2000, help="clean images for the recalibration")
    ap.add_argument("--calibration-split", choices=("val", "test_calibration"), default=None,
                    help="the recalibration's images (default: the operating point's, experiments/<ds>/detector.yaml): "
                         "the validation split or the test set's calibration split (mixdefense.splits)")
    ap.add_argument("--case-images", type=int, default=100, help="images of the §6 case studies (numbers); 6 go in the grids")
    ap.add_argument("--case-steps", type=int, default=20, help="steps of the case studies' PGD variants (beside the paper's FGSM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    d = DEFAULTS.get(args.dataset, {"eps": None, "support_dilation": -1})
    if d["eps"] is None and not args.eps:
        ap.error(f"--eps is required for {args.dataset} (no default budgets; defaults exist for {sorted(DEFAULTS)})")
    args.calibration_split = args.calibration_split or operating_point(args.dataset)["calibration_split"]
    if args.norm == "l2" and not args.eps:
        ap.error("--norm l2 needs --eps (whole-image L2 budgets; the defaults are L∞ ones)")
    args.eps = sorted(args.eps or d["eps"])
    args.support_dilation = d["support_dilation"] if args.support_dilation is None else args.support_dilation
    args.out = Path(args.out or f"results/{args.dataset}/adaptive")
    if args.num_images < 1 or args.sweep_images < 1 or args.steps < 1:
        ap.error("--num-images, --sweep-images and --steps must be >= 1")
    if args.queries < 1 or args.restarts < 1 or args.hsj_candidates < 1 or not 0 < args.square_p_init <= 1 or args.square_lam < 0:
        ap.error("--queries, --restarts, --hsj-candidates must be >= 1, --square-p-init in (0, 1], --square-lam >= 0")
    if args.case_steps < 2:
        ap.error("--case-steps must be >= 2 (the one-step attack is always run as the paper's FGSM)")
    return args


# -- setup ---------------------------------------------------------------------------------
def load_pipeline(dataset: str, bundle: str | None):
    """``(MixDefense, source description)``: the bundle, or the parts assembled like ``mixdefense bundle``."""
    from mixdefense.classifiers import load_classifier
    from mixdefense.layers.contranet import ContraNet
    from mixdefense.layers.saec import SAEC
    from mixdefense.pipeline import MixDefense, load_detector

    path = Path(bundle or f"artifacts/{dataset}/detector.pt")
    if path.exists():
        return load_detector(path), str(path)
    if bundle:
        raise FileNotFoundError(f"bundle not found: {bundle}")
    parts = Path(f"artifacts/{dataset}")
    missing = [p for p in ("classifier.pt", "saec.pt", "contranet.pt") if not (parts / p).exists()]
    if missing:
        raise FileNotFoundError(f"no {path} and parts missing in {parts}: {missing} (train them, then `make bundle DATASET={dataset}`)")
    det = MixDefense(load_classifier(parts / "classifier.pt"), [SAEC.load(parts / "saec.pt"), ContraNet.load(parts / "contranet.pt")])
    return det.eval(), f"{parts}/{{classifier,saec,contranet}}.pt"


def contranet_layer(detector):
    layer = next((lay for lay in detector.layers if lay.kind == "post" and hasattr(lay, "reconstructor")), None)
    if layer is None:
        raise ValueError("the detector has no ContraNet layer")
    return layer


def ensure_frr(detector, dataset: str, frr: float, n: int, load_calibration: Callable, split: str = "val") -> dict:
    """Recalibrate ContraNet at ``frr`` on the correctly classified images among ``n`` of ``split``
    unless it already is at ``frr`` (a test-set calibration split is always recalibrated on);
    returns its calibration record with its source.

    ``load_calibration(dataset, split, n) -> (x, y, source)`` (``mixdefense.cli.load_calibration_images``).
    """
    cn = contranet_layer(detector)
    cal = cn.calibration
    if cal is None or abs(cal.target_frr - frr) > 1e-9 or split != "val":
        x_cal, y_cal, source = load_calibration(dataset, split, n)
        pred = detector.classifier.predict(x_cal)
        cal = cn.calibrate(x_cal[pred == y_cal], y_cal[pred == y_cal], frr)
        return {**cal.as_dict(), **source, **calibration_record(y_cal, pred)}
    return cal.as_dict()


def wrong_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A uniformly random label ``≠ y`` per image ``[B]`` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return (y + 1 + torch.randint(0, num_classes - 1, y.shape, generator=g)) % num_classes


def rates(objective: PipelineObjective, x_adv: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Success rates in [0, 1] against the classifier alone, each layer alone, and the whole MixDefense."""
    v = objective.full_verdict(x_adv, t)
    out = {"classifier": v.hit.float().mean().item()}
    for name, acc in v.accepted.items():
        out[name] = (v.hit & acc).float().mean().item()
    out["mixdefense"] = v.fooled.float().mean().item()
    return out


# -- the attacks ---------------------------------------------------------------------------
def run_attack(kind: str, objective, x, t, eps, args, mask, lam=0.0, mu=0.0, progress=True):
    common = {"norm": args.norm, "eps": eps, "steps": args.steps, "kappa": args.kappa, "progress": progress}
    if kind == "pgd":
        return adaptive_pgd(objective, x, t, lam=0.0, mu=0.0, select="last", **common).x_adv
    if kind == "adaptive":
        return adaptive_pgd(objective, x, t, lam=lam, mu=mu, select="pipeline", mask=mask, **common).x_adv
    return orthogonal_pgd(objective, x, t, mode=kind, mask=mask, **common).x_adv


def gradient_free_settings(kind: str, args: argparse.Namespace) -> dict:
    """The settings a gradient-free row records (the attack's own, beside the row's norm and ε)."""
    if kind == "square":
        return {"queries_per_image": args.queries, "restarts": args.restarts, "p_init": args.square_p_init,
                "loss": "max(target margin, 0) + lam * sum_layers relu(log margin + kappa)", "lam": args.square_lam,
                "kappa": args.kappa, "support_mask": args.support_dilation >= 0, "seed": args.seed,
                "success": "the pipeline's deployed decision: every layer accepts and the label is t"}
    return {"queries_per_image": args.queries, "start": f"nearest accepted-as-t image among the {args.hsj_candidates} "
            "nearest loaded test images", "gamma": 1.0, "init_evals": 100, "seed": args.seed,
            "oracle": "accepted by every layer and labelled t (decisions only)",
            "budget_rule": "one minimum-norm run; broken at eps iff its AE has norm <= eps"}


def run_square(objective: PipelineObjective, x: torch.Tensor, t: torch.Tensor, eps: float, args, mask, progress: bool):
    """Targeted Square attack on the whole pipeline at ``eps`` (:func:`mixdefense.attacks.gradient_free.square_attack`)."""
    queries = PipelineQueries(objective, t, targeted=True, kappa=args.kappa, lam=args.square_lam)
    return square_attack(queries.score, x, norm=args.norm, eps=eps, n_queries=args.queries, p_init=args.square_p_init,
                         restarts=args.restarts, mask=mask, generator=torch.Generator().manual_seed(args.seed),
                         progress=progress)


def run_hopskipjump(objective: PipelineObjective, x: torch.Tensor, t: torch.Tensor, pool: torch.Tensor, args, progress: bool):
    """Targeted HopSkipJump on the accept-as-``t`` oracle, started from ``pool`` images (one minimum-norm run)."""
    queries = PipelineQueries(objective, t, targeted=True)
    return hop_skip_jump(queries.is_adversarial, x, pool, norm=args.norm, max_queries=args.queries,
                         start_candidates=args.hsj_candidates, generator=torch.Generator().manual_seed(args.seed),
                         progress=progress)


def gradient_free_attack(attack: str, objective: PipelineObjective, x: torch.Tensor, t: torch.Tensor, eps: float, args,
                         mask, pool: torch.Tensor, cache: dict, progress: bool) -> tuple[torch.Tensor, dict]:
    """``(x_adv [B, C, H, W], the row's extra fields)`` of a gradient-free family at ``eps``.  HopSkipJump runs
    once (kept in ``cache``) and each ε takes the AEs within it (:func:`~mixdefense.attacks.gradient_free.within_budget`)."""
    if attack == "square":
        res = run_square(objective, x, t, eps, args, mask, progress)
        return res.x_adv, {"settings": gradient_free_settings(attack, args), "attack_success": res.success.float().mean().item(),
                           "mean_queries": res.queries.float().mean().item()}
    if "result" not in cache:
        start = time.perf_counter()
        cache["result"] = run_hopskipjump(objective, x, t, pool, args, progress)
        cache["seconds"] = round(time.perf_counter() - start, 2)
    hsj = cache["result"]
    found = hsj.norms[hsj.success]
    return within_budget(hsj, x, eps), {
        "settings": {**gradient_free_settings(attack, args), "run_seconds": cache["seconds"]},
        "attack_success": (hsj.success & (hsj.norms <= eps)).float().mean().item(), "found": hsj.success.float().mean().item(),
        "median_norm": found.median().item() if found.numel() else None, "mean_queries": hsj.queries.float().mean().item()}


def sweep(objective, x, t, args, mask, progress) -> list[dict]:
    rows = []
    combos = [(lam, mu) for lam in args.lambdas for mu in args.mus]
    for eps in args.eps:
        for lam, mu in combos:
            start = time.perf_counter()
            x_adv = run_attack("adaptive", objective, x, t, eps, args, mask, lam, mu, progress)
            rows.append({"eps": eps, "lam": lam, "mu": mu, "images": len(t), **rates(objective, x_adv, t),
                         "seconds": round(time.perf_counter() - start, 2)})
            print(f"  sweep ε={eps:.4g} λ={lam:g} μ={mu:g}: fooled MixDefense {rows[-1]['mixdefense']:.3f} "
                  f"(classifier {rows[-1]['classifier']:.3f}) {rows[-1]['seconds']:.1f}s", flush=True)
    return rows


def best_weights(sweep_rows: list[dict]) -> dict[float, tuple[float, float]]:
    """Per ε, the ``(λ, μ)`` with the highest MixDefense success (ties: higher classifier success, then smaller weights)."""
    best = {}
    for eps in sorted({r["eps"] for r in sweep_rows}):
        cand = [r for r in sweep_rows if r["eps"] == eps]
        r = max(cand, key=lambda r: (r["mixdefense"], r["classifier"], -(r["lam"] + r["mu"])))
        best[eps] = (r["lam"], r["mu"])
    return best


# -- §6 case studies -------------------------------------------------------------------------
@torch.no_grad()
def _accepts(cn, x32: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """ContraNet's verdict on ``(x, reconstruction)`` pairs: ``True`` where every score is below its threshold."""
    from mixdefense.layers.contranet import image_scores

    parts = image_scores(x32, rec, cn.scores, cn.metric, cn.distance)
    return ~cn.decide(parts)


@torch.no_grad()
def _binding(classifier, rec: torch.Tensor, t: torch.Tensor) -> float:
    return (classifier(resize_for(classifier, rec)).argmax(1) == t).float().mean().item()


def case_studies(detector, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, out: Path, dataset: str, grid_rows: int = 6,
                 pgd_steps: int = 20) -> dict:
    """§6 (a) FGSM on the cGAN input and (b) FGSM / PGD on ``z``; numbers on all of ``x``, grids on the first rows."""
    cn = contranet_layer(detector)
    rec, clf = cn.reconstructor, detector.classifier
    side = rec.image_size
    x32 = x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                       align_corners=False).clamp(0, 1)
    with torch.no_grad():
        base = rec(x32, t)
    result = {"images": len(t), "clean_under_t": {
        "contranet_accepts": _accepts(cn, x32, base).float().mean().item(),
        "reconstruction_classified_as_t": _binding(clf, base, t),
        "dist_x_rec": reconstruction_distance(x32, base).mean().item()}}
    # (a) Figure 12
    cols_a = [("x (true y)", x32[:grid_rows]), ("G(μ(x), t)", base[:grid_rows])]
    rows_a = []
    for steps in (1, pgd_steps):
        for eps in CASE_EPS:
            x_adv = fgsm_on_cgan_input(rec, x32, t, eps, steps=steps)
            with torch.no_grad():
                r = rec(x_adv, t)
            rows_a.append({"attack": "fgsm" if steps == 1 else f"pgd{steps}", "eps": eps,
                           "linf": perturbation_norm(x_adv, x32, "linf").max().item(),
                           "contranet_accepts": _accepts(cn, x_adv, r).float().mean().item(),
                           "reconstruction_classified_as_t": _binding(clf, r, t),
                           "dist_x_rec": reconstruction_distance(x_adv, r).mean().item()})
            if steps == 1 or eps == CASE_EPS[-1]:
                name = "FGSM" if steps == 1 else f"PGD-{steps}"
                cols_a += [(f"AE {name} ε={eps:g}", x_adv[:grid_rows]), ("G(μ(AE), t)", r[:grid_rows])]
    labels = [f"y={int(a)} → t={int(b)}" for a, b in zip(y[:grid_rows], t[:grid_rows])]
    case_study_grid(cols_a, out / "figure12.png", row_labels=labels,
                    title=f"§6 (a) on {dataset}: targeted FGSM on the cGAN input so that G(μ(x_adv), t) ≈ x_adv")
    # (b) Figure 13
    with torch.no_grad():
        z0 = rec.encoder(x32)[0]
    cols_b = [("x (true y)", x32[:grid_rows]), ("G(μ(x), t)", base[:grid_rows])]
    rows_b = []
    for steps in (1, pgd_steps):
        for eps in LATENT_EPS:
            z = attack_latent(rec.generator, z0, t, x32, eps, steps=steps)
            with torch.no_grad():
                g = rec.generator(z, t)
            rows_b.append({"attack": "fgsm" if steps == 1 else f"pgd{steps}", "eps": eps,
                           "z_linf": (z - z0).abs().amax().item(),
                           "contranet_accepts": _accepts(cn, x32, g).float().mean().item(),
                           "reconstruction_classified_as_t": _binding(clf, g, t),
                           "dist_x_rec": reconstruction_distance(x32, g).mean().item()})
            if steps == 1 or eps == LATENT_EPS[-1]:
                name = "FGSM" if steps == 1 else f"PGD-{steps}"
                cols_b.append((f"G(z+δ, t) {name} ε={eps:g}", g[:grid_rows]))
    case_study_grid(cols_b, out / "figure13.png", row_labels=labels,
                    title=f"§6 (b) on {dataset}: attack on the latent z so that G(z+δ, t) ≈ x (label t fixed)")
    result["fgsm_on_cgan_input"] = rows_a
    result["attack_on_z"] = rows_b
    return result


# -- outputs -------------------------------------------------------------------------------
def plot_success(rows: list[dict], path: Path, title: str, norm: str) -> Path:
    from mixdefense.evaluation.plots import plt, save_figure

    panels = [("classifier", "vs classifier alone"), ("saec", "vs SAEC (classified t, SAEC accepts)"),
              ("contranet", "vs ContraNet (classified t, ContraNet accepts)"), ("mixdefense", "vs whole MixDefense")]
    small = max(r["eps"] for r in rows) < 0.1  # GTSRB-sized budgets read better in 1/255 steps
    scale, unit = ((255.0, "ε (L∞, ×1/255)") if small else (1.0, "ε (L∞, [0, 1] scale)")) if norm == "linf" \
        else (1.0, "ε (L2, whole image)")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    styles = {"pgd": ("non-adaptive targeted PGD", "o", "--"), "adaptive": ("full adaptive (best λ, μ)", "s", "-"),
              "orthogonal": ("Orthogonal PGD", "^", "-"), "selective": ("Selective PGD", "v", ":"),
              "square": ("Square (gradient-free)", "D", "-."), "hopskipjump": ("HopSkipJump (decisions only)", "x", "-.")}
    for ax, (key, name) in zip(axes, panels):
        for attack, (label, marker, ls) in styles.items():
            pts = sorted((r for r in rows if r["attack"] == attack), key=lambda r: r["eps"])
            if pts:
                ax.plot([r["eps"] * scale for r in pts], [r[key] for r in pts], marker=marker, ls=ls, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attack success rate (target label t)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows)
    atomic_write_text(path, buf.getvalue())


def print_table(rows: list[dict], norm: str) -> None:
    scale = 255 if norm == "linf" and max(r["eps"] for r in rows) < 0.1 else 1
    print(f"{'attack':<11} {'eps' + ('×255' if scale == 255 else ''):>8} {'λ':>5} {'μ':>5} {'clf':>6} {'saec':>6} {'contra':>6} {'mixdef':>6} {'max‖δ‖':>8} {'sec':>6}")
    for r in rows:
        print(f"{r['attack']:<11} {r['eps'] * scale:>8.3g} {r.get('lam', 0):>5g} {r.get('mu', 0):>5g} {r['classifier']:>6.3f} "
              f"{r['saec']:>6.3f} {r['contranet']:>6.3f} {r['mixdefense']:>6.3f} {r['max_norm']:>8.4g} {r['seconds']:>6.1f}")


def main(argv: list[str], data: Data) -> int:
    load_images, load_calibration = data.load_images, data.load_calibration
    args = parse_args(argv, data)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    wall = {}
    t0 = time.perf_counter()
    detector, source = load_pipeline(args.dataset, args.bundle)
    cal = ensure_frr(detector, args.dataset, args.contranet_frr, args.calibration_images, load_calibration,
                     args.calibration_split)
    num_test = max(2 * args.num_images, args.num_images + 200)  # the protocol's test split: never calibration images
    x_all, y_all = load_images(args.dataset, "test", num_test)
    x, y = correctly_classified(detector.classifier, x_all, y_all, args.num_images)
    if len(y) < args.num_images:
        raise RuntimeError(f"only {len(y)} correctly classified images among {len(y_all)} test images")
    num_classes = detector.classifier.num_classes
    t = wrong_targets(y, num_classes, args.seed)
    objective = PipelineObjective(detector, temperature=args.temperature)
    mask = support_mask(x, args.support_dilation) if args.support_dilation >= 0 else None
    clean = objective.full_verdict(x, y)
    clean_rej = {n: 1 - a.float().mean().item() for n, a in clean.accepted.items()}
    clean_rej["mixdefense"] = 1 - clean.fooled.float().mean().item()
    wall["setup_s"] = time.perf_counter() - t0
    print(f"{args.dataset}: {len(y)} correctly classified test images; pipeline {source}; "
          f"ContraNet at {cal['target_frr']:.0%} FRR (threshold {cal['thresholds']}); clean rejection {clean_rej}", flush=True)

    rows: list[dict] = []
    sweep_rows: list[dict] = []
    best: dict[float, tuple[float, float]] = {}
    if "adaptive" in args.attacks:
        t1 = time.perf_counter()
        n = min(args.sweep_images, len(y))
        sweep_rows = sweep(objective, x[:n], t[:n], args, mask[:n] if mask is not None else None, progress)
        best = best_weights(sweep_rows)
        wall["sweep_s"] = time.perf_counter() - t1
    hsj_cache: dict = {}
    for attack in args.attacks:
        t1 = time.perf_counter()
        for eps in args.eps:
            start = time.perf_counter()
            head = {"attack": attack, "family": attack, "threat_model": THREAT_MODELS[attack], "norm": args.norm, "eps": eps}
            extra: dict = {}
            if attack in GRADIENT_FREE:
                x_adv, extra = gradient_free_attack(attack, objective, x, t, eps, args, mask, x_all, hsj_cache, progress)
            else:
                lam, mu = best.get(eps, (0.0, 0.0)) if attack == "adaptive" else (0.0, 0.0)
                x_adv = run_attack(attack, objective, x, t, eps, args, mask, lam, mu, progress)
                head.update(lam=lam, mu=mu)
            rows.append({**head, "images": len(y), **rates(objective, x_adv, t),
                         "max_norm": perturbation_norm(x_adv, x, args.norm).max().item(),
                         "seconds": round(time.perf_counter() - start, 2), **extra})
            r = rows[-1]
            print(f"  {attack} ε={eps:.4g}: classifier {r['classifier']:.3f} saec {r['saec']:.3f} contranet {r['contranet']:.3f} "
                  f"MixDefense {r['mixdefense']:.3f} ({r['seconds']:.1f}s)", flush=True)
        wall[f"{attack}_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    n_case = min(args.case_images, len(y))
    cases = case_studies(detector, x[:n_case], y[:n_case], t[:n_case], args.out, args.dataset, pgd_steps=args.case_steps)
    wall["case_studies_s"] = time.perf_counter() - t1
    wall["total_s"] = time.perf_counter() - t0
    wall = {k: round(v, 1) for k, v in wall.items()}

    png = plot_success(rows, args.out / "success_vs_eps.png", norm=args.norm,
                       title=f"{args.dataset}: targeted attacks on {len(y)} test images, random wrong target t; "
                             f"ContraNet at {cal['target_frr']:.0%} FRR; {args.steps} steps") if rows else None
    report = {"dataset": args.dataset, "pipeline": source, "images": len(y), "norm": args.norm, "eps": args.eps,
              "steps": args.steps, "alpha": "2.5*eps/steps", "kappa": args.kappa, "saec_surrogate_temperature": args.temperature,
              "support_dilation": args.support_dilation, "seed": args.seed, "contranet_calibration": cal,
              "clean_rejection": clean_rej, "success_definition": "f(x_adv) = t (classifier); and the layer accepts (per layer); "
              "and every layer accepts (mixdefense); over all attacked images", "rows": rows,
              "sweep": {"images": min(args.sweep_images, len(y)), "lambdas": args.lambdas, "mus": args.mus, "rows": sweep_rows,
                        "best": {str(k): {"lam": v[0], "mu": v[1]} for k, v in best.items()}},
              "case_studies": cases, "wall_seconds": wall, "threads": torch.get_num_threads(),
              "figures": [str(p) for p in (png, args.out / "figure12.png", args.out / "figure13.png") if p]}
    atomic_write_text(args.out / "adaptive.json", json.dumps(report, indent=1) + "\n")
    write_csv([{"table": "main", **r} for r in rows] + [{"table": "sweep", "attack": "adaptive", **r} for r in sweep_rows],
              args.out / "adaptive.csv")
    if rows:
        print_table(rows, args.norm)
    print(json.dumps({"case_studies": cases, "wall_seconds": wall}, indent=1))
    print(f"wrote {args.out}/adaptive.json, adaptive.csv, success_vs_eps.png, figure12.png, figure13.png")
    return 0

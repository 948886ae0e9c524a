"""``mixdefense adaptive --dataset mnist|gtsrb|cifar10 [options]``: the adaptive evaluation of the whole MixDefense.

What it measures, on the first ``--num-images`` test images the classifier gets right, for every norm of
``--norms`` (L∞ and L2 by default, [0, 1] pixel units) and every budget ``ε`` of that norm (per-dataset
defaults, or ``--eps`` / ``--eps-linf`` / ``--eps-l2``), for every attacker goal of ``--targets``
(:mod:`mixdefense.attacks.targets`):

* ``untargeted`` — success = the classifier's label is not the true ``y`` and every layer accepts
  (the gradient attacks descend the margin ``z_y − max_{j≠y} z_j``, post layers judged under the
  leading wrong label);
* ``topk:K`` — targeted at each of the ``K`` most likely wrong labels of the clean logits in turn;
  an image is broken if any target's AE fools the pipeline (its first successful AE is kept);
* ``random`` — one seeded random wrong label per image (the previous default);

and for every attack of ``--attacks`` (each row names its ``family``, ``threat_model`` and ``settings``):

* ``pgd`` — oblivious PGD on the bare classifier (``λ = μ = 0``, last iterate);
* ``adaptive`` — the white-box attack :func:`mixdefense.attacks.adaptive.adaptive_pgd` with the
  ``(λ, μ)`` that fooled the whole pipeline most often in a sweep over ``--lambdas`` × ``--mus`` on the
  first ``--sweep-images`` images (per norm, goal and ε; the sweep is reported too);
* ``orthogonal`` (and ``selective`` when asked) — :func:`mixdefense.attacks.adaptive.orthogonal_pgd`;
* ``pgd_tied`` / ``adaptive_tied`` (family ``channel_tied``) and ``pgd_lowfreq`` / ``adaptive_lowfreq``
  (family ``lowfreq``) — the same oblivious / adaptive attacks with the perturbation restricted to
  :class:`~mixdefense.attacks.subspace.ChannelTiedPGD`'s / :class:`~mixdefense.attacks.subspace.LowFrequencyPGD`'s
  subspace (``adaptive_*`` with the sweep's ``(λ, μ)``; channel-tied is skipped on one-channel images,
  where it is plain PGD);
* ``square`` and ``hopskipjump`` — gradient-free attacks on the whole pipeline
  (:mod:`mixdefense.attacks.gradient_free`), the check that no gradient is masked: Square on the
  classifier's margin plus a penalty per rejecting layer, ``--queries`` per image, ε and restart;
  HopSkipJump on the accept-as-wrong-label oracle, run once (minimum-norm): broken at ε iff its AE has
  norm ``≤ ε``.

Gradient attacks run ``--restarts`` times: run 1 from the clean image, later runs from a random point of
the budget and only on the images no earlier run broke (an image keeps its first successful AE).

Success rates (over all attacked images): against the classifier alone, against each layer alone (fooled
and that layer accepts), and against the whole MixDefense (fooled and every layer accepts), always decided
by the *real* layers.  ContraNet runs at ``--contranet-frr`` clean false rejection (default 5 %, Bryniarski
et al.'s operating point; recalibrated on the correctly classified ``--calibration-split`` images when the
loaded detector uses another rate).

Then the robust-accuracy table per (norm, ε): the defended robust accuracy (images no attack broke, per-image
worst case over every attack and goal; 95 % Wilson interval; the strongest single attack named), the undefended
classifier's and Madry's model's (``artifacts/<ds>/madry.pt``) under untargeted PGD with the same steps and
restarts, and Tramèr's reduction (ICML 2022): beside the defended figure at ε, the best robust accuracy known at
ε/2 (:data:`~mixdefense.evaluation.robust.KNOWN_ROBUST`, sourced; "no known figure" otherwise); built by
:mod:`mixdefense.evaluation.robust`.

Every finished row (and every sweep cell) is saved as a part file under ``--partial-dir`` (default
``runs/<ds>/adaptive_partial``), named by a digest of everything that determines it; a rerun loads the
finished parts ("reused") instead of recomputing, so a killed run resumes
(:class:`mixdefense.evaluation.parts.PartStore`).

Then the paper's §6 case studies: (a) targeted FGSM on the cGAN's input (Figure 12) and (b) FGSM / PGD on
the latent ``z`` (Figure 13), with grids and numbers (random wrong targets;
:mod:`mixdefense.evaluation.case_studies`).

Writes ``<out>/{adaptive.json, adaptive.csv, robust_accuracy.md, success_vs_eps_<norm>_<targets>.png,
figure12.png, figure13.png}`` (default ``results/<ds>/adaptive``), atomically.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from mixdefense.attacks import perturbation_norm
from mixdefense.attacks.adaptive import (
    PipelineObjective,
    adaptive_pgd,
    make_subspace,
    orthogonal_pgd,
    support_mask,
    with_restarts,
)
from mixdefense.attacks.gradient_free import PipelineQueries, hop_skip_jump, square_attack, within_budget
from mixdefense.attacks.targets import is_targeted, mode_slug, target_mode, target_sets, wrong_targets
from mixdefense.calibration import calibration_record
from mixdefense.commands import CALIBRATION_SPLITS, Data, operating_point
from mixdefense.evaluation.case_studies import case_studies, contranet_layer
from mixdefense.evaluation.curves import correctly_classified
from mixdefense.evaluation.parts import PartStore
from mixdefense.evaluation.robust import KNOWN_ROBUST, print_robust, robust_entry, robust_markdown
from mixdefense.io import atomic_write_text

LoadImages = Callable[..., tuple[torch.Tensor, torch.Tensor]]

NORMS = ("linf", "l2")
_LINF_255 = [k / 255 for k in (1, 2, 4, 8, 16, 32)]
#: Per-dataset defaults (budgets in [0, 1] pixel units; L2 over the whole image): the robustness sweep's
#: budgets.  MNIST: the attacker perturbs only the digit and a 2-px rim (SAEC's residuals stay exactly 0 on
#: the flat background).
DEFAULTS = {
    "mnist": {"eps": {"linf": [0.05, 0.1, 0.2, 0.3], "l2": [0.5, 1.0, 2.0, 3.0]}, "support_dilation": 2},
    "gtsrb": {"eps": {"linf": _LINF_255, "l2": [0.25, 0.5, 1.0, 2.0]}, "support_dilation": -1},
    "cifar10": {"eps": {"linf": _LINF_255, "l2": [0.25, 0.5, 1.0, 2.0]}, "support_dilation": -1},
}
OBLIVIOUS = "oblivious attacker (AEs against the bare classifier)"
WHITE_BOX = "adaptive attacker (white-box, whole pipeline)"
GRADIENT_FREE_THREAT = "adaptive attacker (gradient-free, whole pipeline)"


@dataclass(frozen=True)
class AttackKind:
    """An attack of the command: its ``family``, ``threat_model``, whether it aims at the whole pipeline
    (``adaptive``; else at the bare classifier), its perturbation subspace, whether it needs no gradient."""

    family: str
    threat_model: str
    adaptive: bool
    subspace: str | None = None
    gradient_free: bool = False


ATTACKS = {
    "pgd": AttackKind("pgd", OBLIVIOUS, False),
    "adaptive": AttackKind("adaptive", WHITE_BOX, True),
    "orthogonal": AttackKind("orthogonal", WHITE_BOX, True),
    "selective": AttackKind("selective", WHITE_BOX, True),
    "pgd_tied": AttackKind("channel_tied", OBLIVIOUS, False, "channel_tied"),
    "adaptive_tied": AttackKind("channel_tied", WHITE_BOX, True, "channel_tied"),
    "pgd_lowfreq": AttackKind("lowfreq", OBLIVIOUS, False, "lowfreq"),
    "adaptive_lowfreq": AttackKind("lowfreq", WHITE_BOX, True, "lowfreq"),
    "square": AttackKind("square", GRADIENT_FREE_THREAT, True, gradient_free=True),
    "hopskipjump": AttackKind("hopskipjump", GRADIENT_FREE_THREAT, True, gradient_free=True),
}
GRADIENT_FREE = ("square", "hopskipjump")
THREAT_MODELS = {name: kind.threat_model for name, kind in ATTACKS.items()}
DEFAULT_ATTACKS = [a for a in ATTACKS if a != "selective"]
SWEPT = ("adaptive", "adaptive_tied", "adaptive_lowfreq")  # the attacks that take the sweep's (λ, μ)
DEFAULT_TARGETS = ["untargeted", "topk:3"]
PART_VERSION = 1  # bump when a part's meaning changes: every older part is then recomputed

def parse_args(argv: list[str], data: Data) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="mixdefense adaptive", description=__doc__.split("\n\n")[0])
    data.add_dataset_argument(ap)
    ap.add_argument("--bundle", default=None, help="detector bundle (default artifacts/<ds>/detector.pt if present, "
                                                   "else assembled from artifacts/<ds>/{classifier,saec,contranet}.pt)")
    ap.add_argument("--out", default=None, help="report folder (default results/<ds>/adaptive)")
    ap.add_argument("--partial-dir", default=None,
                    help="finished rows as part files, reused by a rerun (default runs/<ds>/adaptive_partial)")
    ap.add_argument("--num-images", type=int, default=500, help="correctly classified test images attacked")
    ap.add_argument("--sweep-images", type=int, default=100, help="images of the (λ, μ) sweep (the first ones)")
    ap.add_argument("--norms", nargs="+", choices=NORMS, default=None,
                    help="threat models run (default: linf and l2; only linf when --eps is given without a norm)")
    ap.add_argument("--norm", choices=NORMS, default=None, help="one norm (the same as --norms NORM)")
    ap.add_argument("--eps", type=float, nargs="+", default=None,
                    help="budgets of the one norm run, [0, 1] pixel units (default per dataset and norm)")
    ap.add_argument("--eps-linf", type=float, nargs="+", default=None, help="L∞ budgets (overrides the default)")
    ap.add_argument("--eps-l2", type=float, nargs="+", default=None, help="L2 budgets, whole image (overrides the default)")
    ap.add_argument("--targets", nargs="+", type=target_mode, default=None,
                    help="attacker goals: untargeted, topk:K (the K most likely wrong labels), random "
                         f"(one seeded random wrong label); default {' '.join(DEFAULT_TARGETS)}")
    ap.add_argument("--steps", type=int, default=100, help="PGD steps (every gradient attack; step 2.5·ε/steps)")
    ap.add_argument("--restarts", type=int, default=2,
                    help="runs per image of every gradient attack (run 1 from x, later ones from random starts, only "
                         "on images not yet broken) and of square (each later run re-attacks the images not yet broken)")
    ap.add_argument("--confidence", type=float, default=0.0,
                    help="untargeted gradient attacks: the margin z_y - max_{j≠y} z_j is pushed down to -confidence (logits)")
    ap.add_argument("--lowfreq-factor", type=int, default=4, help="lowfreq family: δ is a grid of 1/factor the side, upsampled")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="ContraNet weights λ of the sweep")
    ap.add_argument("--mus", type=float, nargs="+", default=[0.0, 1.0, 10.0], help="SAEC-surrogate weights μ of the sweep")
    ap.add_argument("--kappa", type=float, default=0.1, help="hinge offset on log margins")
    ap.add_argument("--temperature", type=float, default=0.05, help="SoftSAEC edge width, fraction of a bin")
    ap.add_argument("--support-dilation", type=int, default=None,
                    help="adaptive attacks perturb only pixels within this many px of non-zero content (-1: everywhere; "
                         "default per dataset; not the subspace families)")
    ap.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS, choices=list(ATTACKS))
    ap.add_argument("--queries", type=int, default=1000, help="gradient-free attacks: queries per image (square: per ε and restart)")
    ap.add_argument("--square-p-init", type=float, default=0.8, help="square: initial fraction of the image a square covers")
    ap.add_argument("--square-lam", type=float, default=1.0, help="square: weight of the rejecting layers' penalty (hinge at --kappa)")
    ap.add_argument("--hsj-candidates", type=int, default=200,
                    help="hopskipjump: nearest loaded test images tried as starts per image (queries of the budget)")
    ap.add_argument("--madry", default=None, help="Madry's adversarially trained classifier for the robust table "
                                                  "(default artifacts/<ds>/madry.pt; missing: 'not shipped')")
    ap.add_argument("--contranet-frr", type=float, default=0.05, help="ContraNet's clean false-rejection rate (recalibrated if needed)")
    ap.add_argument("--calibration-images", type=int, default=2000, help="clean images for the recalibration")
    ap.add_argument("--config", default=None,
                    help="operating-point file whose calibration_split is the default of --calibration-split "
                         "(default experiments/<ds>/detector.yaml)")
    ap.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default=None,
                    help="the recalibration's images (default: the operating point's, --config): "
                         "the validation split (val: single images; val_groups: whole groups such as GTSRB's sign tracks) or the test set's calibration split (mixdefense.splits)")
    ap.add_argument("--case-images", type=int, default=100, help="images of the §6 case studies (numbers); 6 go in the grids")
    ap.add_argument("--case-steps", type=int, default=20, help="steps of the case studies' PGD variants (beside the paper's FGSM)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.norm and args.norms and args.norms != [args.norm]:
        ap.error(f"--norm {args.norm} contradicts --norms {' '.join(args.norms)}")
    norms = args.norms or ([args.norm] if args.norm else (["linf"] if args.eps else list(NORMS)))
    norms = list(dict.fromkeys(norms))
    if args.eps and len(norms) > 1:
        ap.error("--eps gives the budgets of one norm: pass --norms linf or --norms l2 (or --eps-linf / --eps-l2)")
    d = DEFAULTS.get(args.dataset, {"eps": {}, "support_dilation": -1})
    budgets = {}
    for norm in norms:
        eps = getattr(args, f"eps_{norm}") or args.eps or d["eps"].get(norm)
        if not eps:
            ap.error(f"no default {norm} budgets for {args.dataset} (defaults exist for {sorted(DEFAULTS)}): "
                     f"pass --eps-{norm} (or --eps with --norms {norm})")
        if not all(math.isfinite(e) and e > 0 for e in eps):
            ap.error(f"budgets must be finite and > 0, got {eps}")
        budgets[norm] = sorted(set(eps))
    args.norms, args.budgets = norms, budgets
    args.targets = list(dict.fromkeys(args.targets or DEFAULT_TARGETS))
    args.attacks = list(dict.fromkeys(args.attacks))
    args.calibration_split = args.calibration_split or operating_point(args.dataset, args.config)["calibration_split"]
    args.support_dilation = d["support_dilation"] if args.support_dilation is None else args.support_dilation
    args.out = Path(args.out or f"results/{args.dataset}/adaptive")
    args.partial_dir = Path(args.partial_dir or f"runs/{args.dataset}/adaptive_partial")
    args.madry = Path(args.madry or f"artifacts/{args.dataset}/madry.pt")
    if args.num_images < 1 or args.sweep_images < 1 or args.steps < 1:
        ap.error("--num-images, --sweep-images and --steps must be >= 1")
    if args.queries < 1 or args.restarts < 1 or args.hsj_candidates < 1 or not 0 < args.square_p_init <= 1 or args.square_lam < 0:
        ap.error("--queries, --restarts, --hsj-candidates must be >= 1, --square-p-init in (0, 1], --square-lam >= 0")
    if args.confidence < 0 or args.lowfreq_factor < 1:
        ap.error("--confidence must be >= 0 and --lowfreq-factor >= 1")
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


def pipeline_sha256(dataset: str, bundle: str | None) -> str:
    """sha256 of the bundle file the run loads (or of its parts' hashes, when assembled from parts)."""
    from mixdefense.commands.results_index import sha256_file

    path = Path(bundle or f"artifacts/{dataset}/detector.pt")
    if path.exists():
        return sha256_file(path)
    parts = Path(f"artifacts/{dataset}")
    joined = "".join(sha256_file(parts / p) for p in ("classifier.pt", "saec.pt", "contranet.pt"))
    return hashlib.sha256(joined.encode()).hexdigest()


def images_sha256(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the attacked images (float32 bytes) and their labels (int64 bytes)."""
    h = hashlib.sha256(x.detach().float().contiguous().numpy().tobytes())
    h.update(y.long().contiguous().numpy().tobytes())
    return h.hexdigest()


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


@dataclass
class Setup:
    """What every attack of a run shares (:func:`prepare` builds it; tests build small ones).

    ``x [B, C, H, W]``, ``y [B]``: the attacked (correctly classified) images; ``pool``: the loaded test
    images (HopSkipJump's starts); ``mask``: the adaptive attacks' support mask or ``None``;
    ``fingerprint``: what, besides an attack's own settings, determines its results (images, bundle,
    thresholds, seed) — it goes into every part's digest; ``madry``: Madry's classifier as a
    layer-less :class:`PipelineObjective`, or ``None`` (``madry_note`` says why); ``clean_accuracy``: the
    classifier's accuracy on the loaded test images (for figures over all test images);
    ``clean_accepted [B]``: the pipeline accepts the clean image with its true label.
    """

    objective: PipelineObjective
    x: torch.Tensor
    y: torch.Tensor
    pool: torch.Tensor
    num_classes: int
    mask: torch.Tensor | None
    fingerprint: dict
    madry: PipelineObjective | None = None
    madry_note: str = "not shipped"
    madry_fingerprint: dict = field(default_factory=dict)
    clean_accuracy: float | None = None
    clean_accepted: torch.Tensor | None = None


def load_madry(path: Path, x: torch.Tensor) -> tuple[PipelineObjective | None, str]:
    """Madry's classifier as a layer-less objective (its verdict is the bare classifier's), or ``(None, why not)``."""
    if not path.exists():
        return None, "not shipped"
    from mixdefense.classifiers import load_classifier

    model = load_classifier(path)
    size, channels = getattr(model, "image_size", x.shape[-1]), getattr(model, "in_channels", x.shape[1])
    if size != x.shape[-1] or channels != x.shape[1]:
        return None, f"not comparable: {path} takes {channels}×{size}×{size} images, the pipeline {x.shape[1]}×{x.shape[-1]}×{x.shape[-1]}"
    return PipelineObjective(SimpleNamespace(classifier=model, layers=[])), str(path)


def prepare(args: argparse.Namespace, data: Data) -> tuple[Setup, dict]:
    """Load the pipeline (recalibrated), the attacked images and Madry's model; ``(Setup, record)``."""
    from mixdefense.commands.results_index import sha256_file

    detector, source = load_pipeline(args.dataset, args.bundle)
    cal = ensure_frr(detector, args.dataset, args.contranet_frr, args.calibration_images, data.load_calibration,
                     args.calibration_split)
    num_test = max(2 * args.num_images, args.num_images + 200)  # the protocol's test split: never calibration images
    x_all, y_all = data.load_images(args.dataset, "test", num_test)
    x, y = correctly_classified(detector.classifier, x_all, y_all, args.num_images)
    if len(y) < args.num_images:
        raise RuntimeError(f"only {len(y)} correctly classified test images among {len(y_all)} test images")
    objective = PipelineObjective(detector, temperature=args.temperature)
    clean_accuracy = objective.hits(x_all, y_all).float().mean().item()
    mask = support_mask(x, args.support_dilation) if args.support_dilation >= 0 else None
    clean = objective.full_verdict(x, y)
    fingerprint = {"dataset": args.dataset, "num_images": len(y), "images_sha256": images_sha256(x, y),
                   "model": "mixdefense", "bundle_sha256": pipeline_sha256(args.dataset, args.bundle),
                   "contranet_thresholds": cal["thresholds"], "contranet_target_frr": cal["target_frr"], "seed": args.seed}
    madry, note = load_madry(args.madry, x)
    madry_fp = {**fingerprint, "model": "madry", "bundle_sha256": sha256_file(args.madry) if madry is not None else None,
                "contranet_thresholds": None, "contranet_target_frr": None}
    setup = Setup(objective, x, y, x_all, detector.classifier.num_classes, mask, fingerprint, madry, note, madry_fp,
                  clean_accuracy, clean.fooled)
    clean_rej = {n: 1 - a.float().mean().item() for n, a in clean.accepted.items()}
    clean_rej["mixdefense"] = 1 - clean.fooled.float().mean().item()
    return setup, {"pipeline": source, "contranet_calibration": cal, "clean_rejection": clean_rej,
                   "classifier_clean_accuracy": clean_accuracy, "test_images_loaded": len(y_all)}


# -- the attacks ---------------------------------------------------------------------------
def gradient_free_settings(kind: str, args: argparse.Namespace) -> dict:
    """The settings a gradient-free row records (the attack's own, beside the row's norm and ε)."""
    if kind == "square":
        return {"queries_per_image": args.queries, "restarts": args.restarts, "p_init": args.square_p_init,
                "loss": "max(classifier margin, 0) + lam * sum_layers relu(log margin + kappa)", "lam": args.square_lam,
                "kappa": args.kappa, "support_mask_dilation": args.support_dilation if args.support_dilation >= 0 else None,
                "seed": args.seed, "success": "the pipeline's deployed decision: every layer accepts and the label is "
                "the target (untargeted: not the true label)"}
    return {"queries_per_image": args.queries, "start": f"nearest accepted-as-adversarial image among the {args.hsj_candidates} "
            "nearest loaded test images", "gamma": 1.0, "init_evals": 100, "seed": args.seed,
            "oracle": "accepted by every layer and labelled the target (untargeted: not the true label); decisions only",
            "budget_rule": "one minimum-norm run; broken at eps iff its AE has norm <= eps"}


def attack_settings(attack: str, mode: str, args: argparse.Namespace, lam: float = 0.0, mu: float = 0.0) -> dict:
    """Everything of ``attack``'s own that determines its row (recorded as the row's ``settings``, and digested)."""
    kind, targeted = ATTACKS[attack], is_targeted(mode)
    if kind.gradient_free:
        s = gradient_free_settings(attack, args)
    else:
        s = {"steps": args.steps, "alpha": "2.5*eps/steps", "restarts": args.restarts,
             "starts": "run 1 from x; later runs from a random point of the budget, on the images not yet broken",
             "restart_success": "the whole pipeline fooled" if kind.adaptive else "the bare classifier fooled",
             "classifier_loss": "CE(f(x), t)" if targeted else "max(z_y - max_{j != y} z_j, -confidence)",
             "seed": args.seed}
        if not targeted:
            s["confidence"] = args.confidence
        if attack in SWEPT:
            s.update(lam=lam, mu=mu, kappa=args.kappa, select="pipeline (first accepted iterate)",
                     saec_surrogate_temperature=args.temperature)
        elif kind.adaptive:  # orthogonal, selective
            s.update(mode=attack, kappa=args.kappa, select="pipeline (first accepted iterate)",
                     saec_surrogate_temperature=args.temperature)
        else:
            s.update(lam=0.0, mu=0.0, select="last iterate")
        if kind.subspace:
            s["subspace"] = {"kind": kind.subspace, **({"factor": args.lowfreq_factor} if kind.subspace == "lowfreq" else {})}
        s["support_mask_dilation"] = args.support_dilation if kind.adaptive and not kind.subspace and args.support_dilation >= 0 else None
    s["targets"] = {"untargeted": "the true label (success: any other label)", "random": "one seeded random wrong label"}.get(
        mode, f"each of the {mode.split(':')[-1]} most likely wrong labels of the clean logits in turn, each on the images the "
              "earlier ones did not break; broken if any target's AE fools the pipeline (its first successful AE kept)")
    return s


def _fooled(objective: PipelineObjective, x: torch.Tensor, labels: torch.Tensor, targeted: bool, batch_size: int = 250):
    """``[B]`` bool: the whole pipeline is fooled (post layers only where they can matter), in batches."""
    parts = [objective.verdict(xb, lb, targeted=targeted).fooled for xb, lb in zip(x.split(batch_size), labels.split(batch_size))]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def gradient_attack(attack: str, objective: PipelineObjective, x: torch.Tensor, labels: torch.Tensor, targeted: bool,
                    norm: str, eps: float, args, mask: torch.Tensor | None, lam: float = 0.0, mu: float = 0.0,
                    progress: bool = True) -> torch.Tensor:
    """AEs ``[B, C, H, W]`` of a gradient attack at ``eps``, with ``--restarts`` (:func:`with_restarts`): oblivious
    attacks re-attack the images the bare classifier still gets right, adaptive ones those the pipeline still stops."""
    kind = ATTACKS[attack]
    gen = torch.Generator().manual_seed(args.seed)
    sub = make_subspace(kind.subspace, objective.classifier, norm=norm, eps=eps, steps=args.steps,
                        factor=args.lowfreq_factor) if kind.subspace else None
    m = mask if kind.adaptive and sub is None else None
    common = {"norm": norm, "eps": eps, "steps": args.steps, "kappa": args.kappa, "progress": progress, "generator": gen,
              "targeted": targeted, "confidence": args.confidence}

    def once(idx: torch.Tensor, rand: bool) -> torch.Tensor:
        mi = m[idx] if m is not None else None
        if attack in ("orthogonal", "selective"):
            return orthogonal_pgd(objective, x[idx], labels[idx], mode=attack, mask=mi, rand_init=rand, **common).x_adv
        if kind.adaptive:
            return adaptive_pgd(objective, x[idx], labels[idx], lam=lam, mu=mu, select="pipeline", mask=mi, subspace=sub,
                                rand_init=rand, **common).x_adv
        return adaptive_pgd(objective, x[idx], labels[idx], select="last", subspace=sub, rand_init=rand, **common).x_adv

    def success(xa: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return _fooled(objective, xa, labels[idx], targeted) if kind.adaptive else objective.hits(xa, labels[idx], targeted)

    return with_restarts(once, x, args.restarts, success)[0]


def one_target(setup: Setup, args, attack: str, norm: str, eps: float, labels: torch.Tensor, targeted: bool,
               todo: torch.Tensor, lam: float, mu: float, hsj_cache: dict, key: tuple, progress: bool):
    """AEs ``[len(todo), C, H, W]`` of ``attack`` toward ``labels`` (untargeted: the true labels) on ``x[todo]``,
    and per-image extras (queries spent; HopSkipJump's norms)."""
    obj, x = setup.objective, setup.x
    mask = setup.mask[todo] if setup.mask is not None else None
    if attack == "square":
        q = PipelineQueries(obj, labels[todo], targeted=targeted, kappa=args.kappa, lam=args.square_lam)
        res = square_attack(q.score, x[todo], norm=norm, eps=eps, n_queries=args.queries, p_init=args.square_p_init,
                            restarts=args.restarts, mask=mask, generator=torch.Generator().manual_seed(args.seed),
                            progress=progress)
        return res.x_adv, {"queries": res.queries.float()}
    if attack == "hopskipjump":
        if key not in hsj_cache:  # one minimum-norm run per goal and target, on every image; each ε takes what fits
            start = time.perf_counter()
            q = PipelineQueries(obj, labels, targeted=targeted)
            hsj_cache[key] = hop_skip_jump(q.is_adversarial, x, setup.pool, norm=norm, max_queries=args.queries,
                                           start_candidates=args.hsj_candidates,
                                           generator=torch.Generator().manual_seed(args.seed), progress=progress)
            hsj_cache[key].info["run_seconds"] = round(time.perf_counter() - start, 2)
        hsj = hsj_cache[key]
        norms = torch.where(hsj.success, hsj.norms, torch.full_like(hsj.norms, float("inf")))
        return within_budget(hsj, x, eps)[todo], {"queries": hsj.queries[todo].float(), "norms": norms[todo]}
    return gradient_attack(attack, obj, x[todo], labels[todo], targeted, norm, eps, args, mask, lam, mu, progress), {}


def attack_part(setup: Setup, args, attack: str, mode: str, norm: str, eps: float, lam: float, mu: float,
                store: PartStore, hsj_cache: dict, progress: bool) -> dict:
    """The part of one row (attack, goal, norm, ε): loaded when finished before, else computed and saved.

    ``{"row": the table row, "per_image": {"classifier" | <layer> | "mixdefense": [0/1 per image]},
    "broken_by_target": [index of the target whose AE fooled the pipeline, -1: none]}``.  Columns are "any
    target": ``classifier`` = the classifier fooled, ``<layer>`` = fooled and that layer accepts,
    ``mixdefense`` = fooled and every layer accepts.
    """
    kind, targeted = ATTACKS[attack], is_targeted(mode)
    settings = attack_settings(attack, mode, args, lam, mu)
    spec = {"version": PART_VERSION, "kind": "row", "attack": attack, "targets": mode, "norm": norm, "eps": eps,
            "settings": settings, **setup.fingerprint}
    label = f"{attack} [{mode}] {norm} ε={eps:.4g}" + ("" if setup.fingerprint.get("model") == "mixdefense" else
                                                       f" ({setup.fingerprint.get('model')})")
    part = store.load(spec)
    if part is not None:
        print(f"  reused {label} ({store.path(spec).name})", flush=True)
        part["row"]["reused"] = True
        return part
    start = time.perf_counter()
    obj, x = setup.objective, setup.x
    b, names = len(x), obj.names
    cols = {k: torch.zeros(b, dtype=torch.bool) for k in ("classifier", *names, "mixdefense")}
    by = torch.full((b,), -1, dtype=torch.long)
    x_keep = x.clone()
    queries, hsj_norms = torch.zeros(b), torch.full((b,), float("inf"))
    logits = obj_logits(obj, x) if mode.startswith("topk") else None
    label_sets = target_sets(mode, logits, setup.y, setup.num_classes, args.seed)
    for k, labels in enumerate(label_sets):
        todo = (~cols["mixdefense"]).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        xa, info = one_target(setup, args, attack, norm, eps, labels, targeted, todo, lam, mu, hsj_cache, (norm, mode, k), progress)
        v = obj.full_verdict(xa, labels[todo], targeted=targeted)
        cols["classifier"][todo] |= v.hit
        for n in names:
            cols[n][todo] |= v.hit & v.accepted[n]
        cols["mixdefense"][todo] |= v.fooled
        by[todo[v.fooled]] = k
        if k == 0:
            x_keep[todo] = xa
        else:
            x_keep[todo[v.fooled]] = xa[v.fooled]
        if "queries" in info:
            queries[todo] += info["queries"]
        if "norms" in info:
            hsj_norms[todo] = torch.minimum(hsj_norms[todo], info["norms"])
    row = {"attack": attack, "family": kind.family, "threat_model": kind.threat_model, "targets": mode, "norm": norm, "eps": eps}
    if not kind.gradient_free:
        row.update(lam=lam, mu=mu)
    row.update({"images": b, **{k: v.float().mean().item() for k, v in cols.items()},
                "max_norm": perturbation_norm(x_keep, x, norm).max().item(), "seconds": round(time.perf_counter() - start, 2),
                "settings": settings})
    if kind.gradient_free:
        row.update(attack_success=row["mixdefense"], mean_queries=queries.mean().item())
    if attack == "hopskipjump":
        found = hsj_norms[torch.isfinite(hsj_norms)]
        row.update(found=torch.isfinite(hsj_norms).float().mean().item(), median_norm=found.median().item() if found.numel() else None,
                   run_seconds=sum(c.info.get("run_seconds", 0.0) for kk, c in hsj_cache.items() if kk[:2] == (norm, mode)))
    part = {"row": row, "per_image": {k: v.int().tolist() for k, v in cols.items()}, "broken_by_target": by.tolist()}
    store.save(spec, part)
    print(f"  {label}: classifier {row['classifier']:.3f} " + " ".join(f"{n} {row[n]:.3f}" for n in names)
          + f" MixDefense {row['mixdefense']:.3f} ({row['seconds']:.1f}s)", flush=True)
    return part


@torch.no_grad()
def obj_logits(objective: PipelineObjective, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """The classifier's clean logits ``[B, K]`` (the top-k targets come from them)."""
    return torch.cat([objective.classifier(xb) for xb in x.split(batch_size)])


def rates(objective: PipelineObjective, x_adv: torch.Tensor, t: torch.Tensor, targeted: bool = True) -> dict[str, float]:
    """Success rates in [0, 1] against the classifier alone, each layer alone, and the whole MixDefense."""
    v = objective.full_verdict(x_adv, t, targeted=targeted)
    out = {"classifier": v.hit.float().mean().item()}
    for name, acc in v.accepted.items():
        out[name] = (v.hit & acc).float().mean().item()
    out["mixdefense"] = v.fooled.float().mean().item()
    return out


def sweep(setup: Setup, args, norm: str, mode: str, store: PartStore, progress: bool) -> list[dict]:
    """The (λ, μ) sweep of the full adaptive attack on the first ``--sweep-images`` images, per ε (one run from
    ``x``; the goal's first target set: the true labels, the random target, or the most likely wrong label)."""
    obj = setup.objective
    n = min(args.sweep_images, len(setup.y))
    x = setup.x[:n]
    logits = obj_logits(obj, x) if mode.startswith("topk") else None
    labels = target_sets(mode, logits, setup.y[:n], setup.num_classes, args.seed)[0]
    mask = setup.mask[:n] if setup.mask is not None else None
    targeted = is_targeted(mode)
    rule = "top1" if mode.startswith("topk") else mode
    rows = []
    for eps in args.budgets[norm]:
        for lam in args.lambdas:
            for mu in args.mus:
                settings = {"steps": args.steps, "alpha": "2.5*eps/steps", "lam": lam, "mu": mu, "kappa": args.kappa,
                            "select": "pipeline (first accepted iterate)", "saec_surrogate_temperature": args.temperature,
                            "support_mask_dilation": args.support_dilation if args.support_dilation >= 0 else None,
                            "images": n, "runs": 1, "seed": args.seed}
                if not targeted:
                    settings["confidence"] = args.confidence
                spec = {"version": PART_VERSION, "kind": "sweep", "attack": "adaptive", "targets": rule, "norm": norm,
                        "eps": eps, "settings": settings, **setup.fingerprint}
                part = store.load(spec)
                if part is not None:
                    rows.append({**part["row"], "targets": mode, "reused": True})
                    print(f"  reused sweep [{rule}] {norm} ε={eps:.4g} λ={lam:g} μ={mu:g}", flush=True)
                    continue
                start = time.perf_counter()
                x_adv = adaptive_pgd(obj, x, labels, norm=norm, eps=eps, steps=args.steps, kappa=args.kappa, lam=lam, mu=mu,
                                     select="pipeline", mask=mask, targeted=targeted, confidence=args.confidence,
                                     progress=progress).x_adv
                row = {"targets": mode, "norm": norm, "eps": eps, "lam": lam, "mu": mu, "images": n,
                       **rates(obj, x_adv, labels, targeted), "seconds": round(time.perf_counter() - start, 2)}
                store.save(spec, {"row": row})
                rows.append(row)
                print(f"  sweep [{rule}] {norm} ε={eps:.4g} λ={lam:g} μ={mu:g}: fooled MixDefense {row['mixdefense']:.3f} "
                      f"(classifier {row['classifier']:.3f}) {row['seconds']:.1f}s", flush=True)
    return rows


def best_weights(sweep_rows: list[dict]) -> dict[float, tuple[float, float]]:
    """Per ε, the ``(λ, μ)`` with the highest MixDefense success (ties: higher classifier success, then smaller weights)."""
    best = {}
    for eps in sorted({r["eps"] for r in sweep_rows}):
        cand = [r for r in sweep_rows if r["eps"] == eps]
        r = max(cand, key=lambda r: (r["mixdefense"], r["classifier"], -(r["lam"] + r["mu"])))
        best[eps] = (r["lam"], r["mu"])
    return best


# -- the evaluation ------------------------------------------------------------------------
def evaluate(setup: Setup, args, progress: bool = True) -> dict:
    """Every row (resumable through ``args.partial_dir``), the sweep, the baselines and the robust table."""
    store = PartStore(args.partial_dir)
    attacks, skipped = [], []
    for a in args.attacks:
        if ATTACKS[a].subspace == "channel_tied" and setup.x.shape[1] == 1:
            skipped.append({"attack": a, "why": "one-channel images: channel-tied PGD is plain PGD"})
        else:
            attacks.append(a)
    rows, parts, sweep_rows, wall = [], {}, [], {}
    for norm in args.norms:
        for mode in args.targets:
            best: dict[float, tuple[float, float]] = {}
            if any(a in SWEPT for a in attacks):
                t1 = time.perf_counter()
                cells = sweep(setup, args, norm, mode, store, progress)
                sweep_rows += cells
                best = best_weights(cells)
                wall["sweep_s"] = wall.get("sweep_s", 0.0) + time.perf_counter() - t1
            hsj_cache: dict = {}
            for attack in attacks:
                t1 = time.perf_counter()
                for eps in args.budgets[norm]:
                    lam, mu = best.get(eps, (0.0, 0.0)) if attack in SWEPT else (0.0, 0.0)
                    part = attack_part(setup, args, attack, mode, norm, eps, lam, mu, store, hsj_cache, progress)
                    rows.append(part["row"])
                    parts[(attack, mode, norm, eps)] = part
                wall[f"{attack}_s"] = wall.get(f"{attack}_s", 0.0) + time.perf_counter() - t1
    # baselines: the undefended classifier and Madry's model under untargeted PGD (same steps and restarts)
    baselines, robust = [], []
    madry_setup = dataclasses.replace(setup, objective=setup.madry, fingerprint=setup.madry_fingerprint, mask=None) \
        if setup.madry is not None else None
    madry_correct = setup.madry.hits(setup.x, setup.y) if setup.madry is not None else None
    t1 = time.perf_counter()
    for norm in args.norms:
        for eps in args.budgets[norm]:
            und = parts.get(("pgd", "untargeted", norm, eps)) or attack_part(setup, args, "pgd", "untargeted", norm, eps, 0.0, 0.0,
                                                                           store, {}, progress)
            baselines.append({**und["row"], "model": "undefended classifier"})
            und_broken = torch.tensor(und["per_image"]["classifier"], dtype=torch.bool)
            madry_robust = None
            if madry_setup is not None:
                mp = attack_part(madry_setup, args, "pgd", "untargeted", norm, eps, 0.0, 0.0, store, {}, progress)
                baselines.append({**mp["row"], "model": "madry", "clean_accuracy_on_attacked": madry_correct.float().mean().item()})
                madry_robust = madry_correct & ~torch.tensor(mp["per_image"]["classifier"], dtype=torch.bool)
            at = [(p["row"], torch.tensor(p["per_image"]["mixdefense"], dtype=torch.bool))
                  for (a, m, n_, e), p in parts.items() if n_ == norm and e == eps]
            if at:
                robust.append(robust_entry(setup.fingerprint["dataset"], norm, eps, at, und_broken, madry_robust,
                                           setup.madry_note, setup.clean_accuracy, setup.clean_accepted))
    wall["baselines_s"] = time.perf_counter() - t1
    attack_seconds: dict[str, float] = {}
    for r in rows:
        attack_seconds[r["attack"]] = round(attack_seconds.get(r["attack"], 0.0) + r["seconds"], 2)
    return {"rows": rows, "sweep_rows": sweep_rows, "baselines": baselines, "robust": robust, "skipped": skipped,
            "wall": {k: round(v, 1) for k, v in wall.items()}, "attack_seconds": attack_seconds,
            "parts": {"dir": str(args.partial_dir), "reused": store.reused, "computed": store.computed}}


# -- outputs -------------------------------------------------------------------------------
PLOT_STYLES = {"pgd": ("oblivious PGD", "o", "--"), "adaptive": ("full adaptive (best λ, μ)", "s", "-"),
               "orthogonal": ("Orthogonal PGD", "^", "-"), "selective": ("Selective PGD", "v", ":"),
               "pgd_tied": ("oblivious channel-tied PGD", "<", "--"), "adaptive_tied": ("adaptive channel-tied", "<", "-"),
               "pgd_lowfreq": ("oblivious low-frequency PGD", ">", "--"), "adaptive_lowfreq": ("adaptive low-frequency", ">", "-"),
               "square": ("Square (gradient-free)", "D", "-."), "hopskipjump": ("HopSkipJump (decisions only)", "x", "-.")}


def plot_success(rows: list[dict], path: Path, title: str, norm: str) -> Path:
    from mixdefense.evaluation.plots import plt, save_figure

    layers = [k for k in rows[0] if k in ("saec", "contranet")]
    panels = [("classifier", "vs classifier alone"), *((k, f"vs {k} (fooled, {k} accepts)") for k in layers),
              ("mixdefense", "vs whole MixDefense")]
    small = max(r["eps"] for r in rows) < 0.2  # GTSRB/CIFAR-sized budgets read better in 1/255 steps
    scale, unit = ((255.0, "ε (L∞, ×1/255)") if small else (1.0, "ε (L∞, [0, 1] scale)")) if norm == "linf" \
        else (1.0, "ε (L2, whole image)")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (key, name) in zip(axes, panels):
        for attack, (label, marker, ls) in PLOT_STYLES.items():
            pts = sorted((r for r in rows if r["attack"] == attack), key=lambda r: r["eps"])
            if pts:
                ax.plot([r["eps"] * scale for r in pts], [r[key] for r in pts], marker=marker, ls=ls, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(unit)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attack success rate")
    axes[-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()} for r in rows)
    atomic_write_text(path, buf.getvalue())


def print_table(rows: list[dict]) -> None:
    names = [k for k in rows[0] if k in ("saec", "contranet")]
    print(f"{'attack':<16} {'targets':<10} {'norm':<4} {'eps':>8} {'λ':>4} {'μ':>4} {'clf':>6} "
          + " ".join(f"{n[:6]:>6}" for n in names) + f" {'mixdef':>6} {'max‖δ‖':>8} {'sec':>7}")
    for r in rows:
        scale = 255 if r["norm"] == "linf" and r["eps"] < 0.2 and abs(r["eps"] * 255 - round(r["eps"] * 255)) < 1e-6 else 1
        eps = f"{r['eps'] * 255:g}/255" if scale == 255 else f"{r['eps']:.4g}"
        print(f"{r['attack']:<16} {r['targets']:<10} {r['norm']:<4} {eps:>8} {r.get('lam', 0):>4g} {r.get('mu', 0):>4g} "
              f"{r['classifier']:>6.3f} " + " ".join(f"{r[n]:>6.3f}" for n in names)
              + f" {r['mixdefense']:>6.3f} {r['max_norm']:>8.4g} {r['seconds']:>7.1f}" + (" reused" if r.get("reused") else ""))


def main(argv: list[str], data: Data) -> int:
    args = parse_args(argv, data)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t0 = time.perf_counter()
    setup, record = prepare(args, data)
    setup_s = time.perf_counter() - t0
    cal = record["contranet_calibration"]
    print(f"{args.dataset}: {len(setup.y)} correctly classified test images; pipeline {record['pipeline']}; "
          f"ContraNet at {cal['target_frr']:.0%} FRR (threshold {cal['thresholds']}); clean rejection {record['clean_rejection']}; "
          f"Madry: {setup.madry_note}; parts in {args.partial_dir}", flush=True)
    ev = evaluate(setup, args, progress)
    t1 = time.perf_counter()
    n_case = min(args.case_images, len(setup.y))
    t_case = wrong_targets(setup.y, setup.num_classes, args.seed)[:n_case]
    cases = case_studies(setup.objective, setup.x[:n_case], setup.y[:n_case], t_case, args.out, args.dataset,
                         pgd_steps=args.case_steps)  # the objective has the detector's classifier and layers
    wall = {"setup_s": round(setup_s, 1), **ev["wall"], "case_studies_s": round(time.perf_counter() - t1, 1),
            "total_s": round(time.perf_counter() - t0, 1)}
    rows = ev["rows"]
    figures = []
    for norm in args.norms:
        for mode in args.targets:
            sel = [r for r in rows if r["norm"] == norm and r["targets"] == mode]
            if sel:
                figures.append(plot_success(sel, args.out / f"success_vs_eps_{norm}_{mode_slug(mode)}.png", norm=norm,
                                            title=f"{args.dataset}: {mode} attacks ({norm}) on {len(setup.y)} test images; "
                                                  f"ContraNet at {cal['target_frr']:.0%} FRR; {args.steps} steps, "
                                                  f"{args.restarts} restart(s)"))
    report = {"dataset": args.dataset, "pipeline": record["pipeline"], "images": len(setup.y), "norms": args.norms,
              "budgets": args.budgets, "targets": args.targets, "attacks": args.attacks, "skipped": ev["skipped"],
              "steps": args.steps, "restarts": args.restarts, "alpha": "2.5*eps/steps", "kappa": args.kappa,
              "confidence": args.confidence, "saec_surrogate_temperature": args.temperature,
              "support_dilation": args.support_dilation, "lowfreq_factor": args.lowfreq_factor, "seed": args.seed,
              "contranet_calibration": cal, "clean_rejection": record["clean_rejection"],
              "classifier_clean_accuracy": record["classifier_clean_accuracy"], "fingerprint": setup.fingerprint,
              "success_definition": "untargeted: f(x_adv) != y; targeted: f(x_adv) = t (any of the top-k targets); classifier "
              "column: that; per layer: and the layer accepts; mixdefense: and every layer accepts; over all attacked images",
              "rows": rows, "robust": ev["robust"], "baselines": ev["baselines"],
              "sweep": {"images": min(args.sweep_images, len(setup.y)), "lambdas": args.lambdas, "mus": args.mus,
                        "rows": ev["sweep_rows"]},
              "known_robust_accuracies": [{"dataset": d, "norm": n, "eps": e, "accuracy": a, "source": s}
                                          for d, n, e, a, s in KNOWN_ROBUST],
              "madry": setup.madry_note, "case_studies": cases, "wall_seconds": wall, "attack_seconds": ev["attack_seconds"],
              "parts": ev["parts"], "threads": torch.get_num_threads(),
              "figures": [str(p) for p in (*figures, args.out / "figure12.png", args.out / "figure13.png")]}
    atomic_write_text(args.out / "adaptive.json", json.dumps(report, indent=1) + "\n")
    write_csv([{"table": "main", **r} for r in rows] + [{"table": "sweep", "attack": "adaptive", **r} for r in ev["sweep_rows"]]
              + [{"table": "baseline", **r} for r in ev["baselines"]] + [{"table": "robust", **e} for e in ev["robust"]],
              args.out / "adaptive.csv")
    atomic_write_text(args.out / "robust_accuracy.md", robust_markdown(
        args.dataset, ev["robust"], note=f"{len(setup.y)} images; {args.steps} steps, {args.restarts} restart(s); goals "
                                         f"{', '.join(args.targets)}; attacks {', '.join(sorted({r['attack'] for r in rows}))}; "
                                         f"classifier clean accuracy {record['classifier_clean_accuracy']:.4f} on "
                                         f"{record['test_images_loaded']} test images.") + "\n")
    if rows:
        print_table(rows)
    if ev["robust"]:
        print_robust(ev["robust"])
    print(json.dumps({"wall_seconds": wall, "attack_seconds": ev["attack_seconds"], "parts": ev["parts"]}, indent=1))
    print(f"wrote {args.out}/adaptive.json, adaptive.csv, robust_accuracy.md, success_vs_eps_*.png, figure12.png, figure13.png")
    return 0

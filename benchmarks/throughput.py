"""Inference throughput: the composite detector beside the classifier alone, Feature Squeezing and MagNet, in one run.

Every detector is timed on its full decision path, what a deployment computes per batch, on the same batch
of real test images (the first ``--batch`` images of the protocol's test split, tiled if there are fewer):

* ``classifier`` — the bundle's classifier alone: ``classifier(x).argmax(1)`` (never rejects);
* ``mixdefense`` — the shipped bundle, ``load_detector("artifacts/<ds>/detector.pt").detect(x)``: input
  validation, SAEC, the classifier on the SAEC-accepted images, ContraNet on the still-accepted ones;
* ``feature_squeezing`` / ``magnet`` — ``artifacts/<ds>/{feature_squeezing,magnet}.pt`` in front of the same
  classifier, as the evaluation uses them (:func:`mixdefense.evaluation.baselines.load_baseline`,
  ``labels_and_margins(x)``; rejected where the margin is ``> 1``): Feature Squeezing's classifier passes on
  ``x`` and on every squeezed copy; MagNet's autoencoder, its detectors and the classifier (the label is the
  classifier's on the reformed ``AE(x)``).  A file that is not shipped is recorded as such.

Speed variants (``--variants``; ``+`` combines them, e.g. ``bf16+channels_last``; :mod:`mixdefense.speed`, which
``mixdefense detect --speed`` also uses), applied to the *networks*
of each path — the classifier, ContraNet's cGAN reconstructor and metric net, MagNet's autoencoder — while the
statistical parts (SAEC, the squeezers, scores and thresholds) stay float32:

* ``fp32`` — the reference;
* ``bf16`` — the networks' forward under ``torch.autocast("cpu", torch.bfloat16)``, outputs cast back to float32;
* ``bf16_layers`` — the same autocast on the detector layers' networks only (ContraNet's reconstructor and metric
  net, MagNet's autoencoder); the classifier stays float32, so the labels are float32's (no-op for the classifier
  alone and Feature Squeezing, which own no network besides it);
* ``channels_last`` — networks and input in channels-last memory format;
* ``compile`` — ``nn.Module.compile()`` of each network (``torch.compile``, default mode); a failure is recorded.

A variant is *usable* when its verdicts (accept/reject decision and label) equal the fp32 ones on
``>= --min-agreement`` (99.9 %) of the first ``--agreement-images`` test images.  Ratio = detector images/s ÷
classifier images/s; the headline pairs each detector's fastest usable variant with the classifier's fastest
usable one (and the fp32/fp32 ratio is reported beside it).  Timings are best-of-``--repeats`` after a warm-up.

    python benchmarks/throughput.py --dataset cifar10                # batch 256, 2 threads, 5 repeats
    python benchmarks/throughput.py --dataset mnist --variants fp32 bf16 channels_last compile

Targets (issue text): the composite's images/s and its ratio to the classifier's at batch 256 on this CPU
(2 threads), with Feature Squeezing's and MagNet's ratios beside it.  Writes
``benchmarks/results/throughput_<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from mixdefense.commands.results_index import sha256_file
from mixdefense.speed import TRANSFORMS, apply_variant, layer_networks, parse_variant

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the datamodules package (as benchmarks/cgan_speed.py)

DEFAULT_VARIANTS = ("fp32", "bf16", "channels_last", "bf16+channels_last", "compile", "channels_last+compile",
                    "bf16_layers+channels_last", "bf16_layers+channels_last+compile")
DETECTORS = ("classifier", "mixdefense", "feature_squeezing", "magnet")
MIN_AGREEMENT = 0.999

#: what each detector computes per batch (recorded in the report)
DECISION_PATHS = {
    "classifier": "classifier(x).argmax(1); never rejects",
    "mixdefense": "load_detector(detector.pt).detect(x): check_input -> SAEC -> classifier on the SAEC-accepted "
                  "-> ContraNet(x, label) on the still-accepted; Verdict.labels, Verdict.rejected",
    "feature_squeezing": "load_baseline(feature_squeezing.pt, classifier).labels_and_margins(x): classifier on x and "
                         "on each squeezed copy; rejected = margin > 1, label = the classifier's",
    "magnet": "load_baseline(magnet.pt, classifier).labels_and_margins(x): autoencoder, detectors, classifier on x "
              "(JSD detectors) and on AE(x); rejected = margin > 1, label = the classifier's on AE(x)",
}

Decision = tuple[torch.Tensor, torch.Tensor]  # (labels [B] int64, rejected [B] bool)


# -- helpers (imported by tests/test_throughput_benchmark.py) ------------------------------------------------------

def _time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call (seconds)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def agreement(reference: Decision, other: Decision) -> float:
    """Fraction of images whose accept/reject decision *and* label equal the reference's."""
    ref_labels, ref_rej = reference
    labels, rej = other
    if ref_labels.shape != labels.shape or ref_rej.shape != rej.shape or ref_labels.shape != ref_rej.shape:
        raise ValueError(f"verdicts of different sizes: {tuple(ref_labels.shape)} vs {tuple(labels.shape)}")
    if ref_labels.numel() == 0:
        raise ValueError("no verdicts to compare")
    same = (ref_labels.cpu() == labels.cpu()) & (ref_rej.cpu().bool() == rej.cpu().bool())
    return float(same.double().mean())


def usable(agree: float | None, min_agreement: float = MIN_AGREEMENT) -> bool:
    """A variant is usable when its verdicts agree with float32's on at least ``min_agreement`` of the images."""
    return agree is not None and agree >= min_agreement


def tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``x`` repeated as often as needed (contiguous)."""
    if len(x) == 0:
        raise ValueError("no images to tile")
    return x.repeat((n + len(x) - 1) // len(x), *([1] * (x.dim() - 1)))[:n].contiguous()


def decide_batched(decide: Callable[[torch.Tensor], Decision], x: torch.Tensor, batch: int) -> Decision:
    """``decide`` over ``x`` in chunks of ``batch``; the verdicts concatenated on the CPU."""
    labels, rejected = [], []
    for chunk in x.split(batch):
        lab, rej = decide(chunk)
        labels.append(lab.cpu())
        rejected.append(rej.cpu().bool())
    return torch.cat(labels), torch.cat(rejected)


def git_commit() -> dict:
    """``{"commit": short hash or None, "dirty": bool or None}`` of the checkout holding this script."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


# -- the decision paths ------------------------------------------------------------------------------------------

def build_path(name: str, bundle, files: dict[str, Path]
               ) -> tuple[Callable[[torch.Tensor], Decision], list[nn.Module], list[nn.Module]]:
    """A fresh (float32) ``(decide, networks, layer networks)`` of detector ``name``: ``decide(x) → (labels,
    rejected)``; the layer networks are the networks other than the classifier."""
    if name == "classifier":
        clf = copy.deepcopy(bundle.classifier).eval()

        def decide(x):
            labels = clf(x).argmax(1)
            return labels, torch.zeros_like(labels, dtype=torch.bool)

        return decide, [clf], []
    if name == "mixdefense":
        det = copy.deepcopy(bundle).eval()

        def decide(x):
            v = det.detect(x)
            return v.labels, v.rejected

        layer_nets = [net for layer in det.layers for net in layer_networks(layer)]
        return decide, [det.classifier, *layer_nets], layer_nets
    from mixdefense.evaluation.baselines import load_baseline

    clf = copy.deepcopy(bundle.classifier).eval()
    baseline = load_baseline(name, files[name], clf)

    def decide(x):
        labels, margins = baseline.labels_and_margins(x)
        return labels, margins > 1

    layer_nets = layer_networks(baseline.layer)
    return decide, [clf, *layer_nets], layer_nets


def measure(name: str, variant: str, bundle, files, x_time, x_agree, reference: Decision | None, args) -> dict:
    """Agreement with float32 (first: it also warms a compiled variant up) and best-of timing of one variant."""
    row: dict = {"variant": variant}
    transforms = parse_variant(variant)
    graphs_before = _compiled_graphs()
    try:
        decide, nets, layer_nets = build_path(name, bundle, files)
        prepare = apply_variant(nets, transforms, layer_nets)
        xa, xt = prepare(x_agree), prepare(x_time)

        @torch.no_grad()
        def run(x):
            return decide(x)

        verdicts = decide_batched(run, xa, args.batch)
        row["agreement"] = 1.0 if reference is None else agreement(reference, verdicts)
        row["usable"] = usable(row["agreement"], args.min_agreement)
        seconds = _time(lambda: run(xt), args.repeats)
        rejected = run(xt)[1]
        row.update(seconds=seconds, images_per_s=len(xt) / seconds, rejected_on_timed_batch=float(rejected.double().mean()))
        row["_verdicts"] = verdicts
    except Exception as err:  # noqa: BLE001 - a failing variant (e.g. torch.compile) is recorded, not fatal
        row.update(error=f"{type(err).__name__}: {err}".strip()[:2000], usable=False)
    if "compile" in transforms:
        row["compiled_graphs"] = _compiled_graphs() - graphs_before  # new Dynamo graphs (0: nothing compiled)
    return row


def _compiled_graphs() -> int:
    """How many graphs TorchDynamo has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a private counter; its absence only loses the record
        return -1


def best_usable(rows: dict[str, dict]) -> str | None:
    """The fastest usable variant among ``{variant: row}`` (None when none is)."""
    ok = [(r["images_per_s"], v) for v, r in rows.items() if r.get("usable") and "images_per_s" in r]
    return max(ok)[1] if ok else None


def summarise(results: dict[str, dict]) -> dict:
    """Per detector: fp32 and fastest-usable images/s and their ratios to the classifier's."""
    clf_rows = results["classifier"]["variants"]
    clf_best = best_usable(clf_rows)
    clf_fp32 = clf_rows.get("fp32", {}).get("images_per_s")
    out = {}
    for name, res in results.items():
        if "variants" not in res:
            out[name] = {"status": res["status"]}
            continue
        rows = res["variants"]
        best = best_usable(rows)
        fp32 = rows.get("fp32", {}).get("images_per_s")
        s = {"fp32_images_per_s": fp32, "fp32_ratio": fp32 / clf_fp32 if fp32 and clf_fp32 else None,
             "best_usable_variant": best, "classifier_best_usable_variant": clf_best}
        if best and clf_best:
            ips = rows[best]["images_per_s"]
            s.update(best_images_per_s=ips, best_ratio=ips / clf_rows[clf_best]["images_per_s"])
        out[name] = s
    return out


def _fmt(v, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    ds, s = report["dataset"], report["summary"]
    lines = [f"# Inference throughput on {ds} (batch {report['batch']}, {report['threads']} threads)", "",
             "`" + report["command"] + "`", "",
             (f"{report['platform']['machine']}, torch {report['platform']['torch']}, commit {report['commit']}"
              f"{' (dirty)' if report.get('dirty') else ''}; best of {report['repeats']} after a warm-up; "
              f"agreement with fp32 on {report['agreement_images']} test images, usable at ≥ {100 * report['min_agreement']:g} %."),
             "", "| detector | fp32 img/s | ratio (fp32) | fastest usable variant | img/s | ratio (fastest usable / classifier's) |",
             "|---|---|---|---|---|---|"]
    for name, r in s.items():
        if "status" in r:
            lines.append(f"| {name} | {r['status']} | | | | |")
            continue
        lines.append(f"| {name} | {_fmt(r['fp32_images_per_s'])} | {_fmt(r['fp32_ratio'], '.3f')} | "
                     f"{r['best_usable_variant'] or 'none'} | {_fmt(r.get('best_images_per_s'))} | {_fmt(r.get('best_ratio'), '.3f')} |")
    lines += ["", "| detector | variant | img/s | ratio to classifier (same variant) | agreement with fp32 | usable |",
              "|---|---|---|---|---|---|"]
    clf = report["detectors"]["classifier"]["variants"]
    for name, res in report["detectors"].items():
        for v, r in res.get("variants", {}).items():
            ips = r.get("images_per_s")
            c = clf.get(v, {}).get("images_per_s")
            if "error" in r:
                lines.append(f"| {name} | {v} | failed: {r['error'].splitlines()[0][:120]} | | | no |")
                continue
            lines.append(f"| {name} | {v} | {_fmt(ips)} | {_fmt(ips / c if ips and c else None, '.3f')} | "
                         f"{100 * r['agreement']:.2f} % | {'yes' if r['usable'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "gtsrb"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--agreement-images", type=int, default=2000)
    ap.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help=f"'fp32' or '+'-joined names from {TRANSFORMS} (fp32 is always measured: the reference)")
    ap.add_argument("--detectors", nargs="+", choices=DETECTORS, default=list(DETECTORS),
                    help="the classifier is always measured (the ratios' denominator)")
    ap.add_argument("--artifacts", default=None, help="folder of detector.pt, feature_squeezing.pt, magnet.pt "
                                                      "(default artifacts/<dataset>)")
    ap.add_argument("--out", default=None, help="JSON report (default benchmarks/results/throughput_<dataset>.json); "
                                                "the markdown table is written beside it (.md)")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.agreement_images < 1 or args.threads < 1:
        ap.error("--batch, --repeats, --agreement-images and --threads must be >= 1")
    try:
        for v in args.variants:
            parse_variant(v)
    except ValueError as err:
        ap.error(str(err))
    variants = ["fp32"] + [v for v in dict.fromkeys(args.variants) if parse_variant(v)]
    detectors = ["classifier"] + [d for d in dict.fromkeys(args.detectors) if d != "classifier"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from tqdm import tqdm

    from mixdefense.cli import load_images
    from mixdefense.pipeline import load_detector

    parts = Path(args.artifacts or ROOT / "artifacts" / args.dataset)
    files = {"mixdefense": parts / "detector.pt", "feature_squeezing": parts / "feature_squeezing.pt",
             "magnet": parts / "magnet.pt"}
    bundle = load_detector(files["mixdefense"])
    n = max(args.batch, args.agreement_images)
    x = load_images(args.dataset, "test", n)[0]
    x_time, x_agree = tile(x[: args.batch], args.batch), x[: args.agreement_images]
    digest = hashlib.sha256(x_agree.numpy().tobytes()).hexdigest()

    results: dict[str, dict] = {}
    jobs = []
    for name in detectors:
        if name in files and not files[name].exists():
            results[name] = {"status": "not shipped", "file": _relative(files[name])}
            continue
        results[name] = {"decision_path": DECISION_PATHS[name], "variants": {}}
        if name in files:
            results[name]["file"] = _relative(files[name])
        jobs += [(name, v) for v in variants]
    reference: dict[str, Decision] = {}
    for name, v in tqdm(jobs, desc="detector/variant", unit="run"):
        row = measure(name, v, bundle, files, x_time, x_agree, reference.get(name) if v != "fp32" else None, args)
        verdicts = row.pop("_verdicts", None)
        if v == "fp32":
            if verdicts is None:
                raise RuntimeError(f"{name} failed in float32: {row.get('error')}")
            reference[name] = verdicts
        results[name]["variants"][v] = row
        tqdm.write(f"{name:18s} {v:24s} " + (f"{row['images_per_s']:10.1f} img/s  agreement {100 * row['agreement']:.2f} %"
                                              if "images_per_s" in row else f"failed: {row.get('error', '')[:200]}"))

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"throughput_{args.dataset}.json"
    report = {
        "dataset": args.dataset,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "batch": args.batch, "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "repeats": args.repeats, "timing": "best of --repeats after one warm-up call, same batch for every detector",
        "images": f"the first {args.batch} images of the protocol's test split" + (" (tiled)" if len(x) < args.batch else ""),
        "agreement_images": len(x_agree), "agreement_images_sha256": digest, "min_agreement": args.min_agreement,
        "variant_scope": "transforms apply to the networks (classifier, ContraNet reconstructor and metric net, MagNet "
                         "autoencoder; bf16_layers: all but the classifier); SAEC, squeezers, scores and thresholds "
                         "stay float32",
        **git_commit(),
        "platform": {"machine": platform.processor() or platform.machine(), "system": platform.platform(),
                     "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count()},
        "artifacts_sha256": {_relative(p): sha256_file(p) for p in files.values() if p.exists()},
        "detectors": results,
    }
    report["summary"] = summarise(results)
    mix = report["summary"].get("mixdefense", {})
    report["headline"] = {"composite_images_per_s": mix.get("best_images_per_s"), "composite_ratio": mix.get("best_ratio"),
                          "variant": mix.get("best_usable_variant"),
                          "feature_squeezing_ratio": report["summary"].get("feature_squeezing", {}).get("best_ratio"),
                          "magnet_ratio": report["summary"].get("magnet", {}).get("best_ratio")}
    from mixdefense.io import atomic_write_text

    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    atomic_write_text(out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Short cGAN probes: what moves the faithfulness / label-binding trade-off (issue 4).

Each variant starts from the dataset's cGAN config (``experiments/<ds>/cgan.yaml``, model
section), overrides a few settings, trains for ``--batches`` batches on the training split
(same seed, same data order) and is scored on the first ``--images`` test images with
:func:`mixdefense.evaluation.reconstruction.evaluate_reconstructions`: mean SSIM of true-label
reconstructions and binding over all wrong labels, judged by the dataset's classifier.

    python benchmarks/cgan_probe.py --dataset mnist --batches 300
    python benchmarks/cgan_probe.py --dataset mnist --variants base,cls1 --batches 600

Writes ``benchmarks/results/cgan_probe_<dataset>.{md,json}`` (a variant already in the
JSON with the same batch count is not re-run, so an interrupted sweep resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import DATAMODULES  # noqa: E402
from lightning_modules.cgan import CGANModule  # noqa: E402
from mixdefense.classifiers import load_classifier  # noqa: E402
from mixdefense.evaluation.reconstruction import evaluate_reconstructions  # noqa: E402
from mixdefense.io import atomic_write_text  # noqa: E402

#: name → (what it changes, overrides of the config's model.init_args)
VARIANTS: dict[str, tuple[str, dict]] = {
    "base": ("the config as it is", {}),
    "slow_lr": ("Adam lr 2e-4 for E, G and D (the authors' setting)", {"lr_g": 2e-4, "lr_e": 2e-4, "lr_d": 2e-4}),
    "no_binding": ("no class critic, no mismatched reals for D", {"w_cls": 0.0, "mismatch_fake": False}),
    "no_cls": ("no class critic (mismatched reals kept)", {"w_cls": 0.0}),
    "no_mismatch": ("no mismatched reals (class critic kept)", {"mismatch_fake": False}),
    "cls3": ("class critic weight 3", {"w_cls": 3.0}),
    "kl0.02": ("KL weight 0.02 (a poorer latent)", {"w_kl": 0.02}),
    "kl0.005": ("KL weight 0.005 (a richer latent)", {"w_kl": 0.005}),
    "z32": ("latent 32", {"latent_dim": 32}),
    "noise": ("uniform noise on the encoder input (p 0.8, amplitude ≤ 0.1)", {"encoder_noise": 0.8}),
    "embed": ("class embedding also concatenated to z in G", {"gen_embed_dim": 32}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist", choices=sorted(DATAMODULES))
    ap.add_argument("--variants", default="base,no_binding", help=f"comma-separated, from {sorted(VARIANTS)}")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"experiments/{args.dataset}/cgan.yaml"), resolve=True)
    base_kw = dict(cfg["model"]["init_args"])
    data_kw = dict(cfg["data"]["init_args"])
    out_json = ROOT / f"benchmarks/results/cgan_probe_{args.dataset}.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}

    dm = DATAMODULES[args.dataset](**data_kw)
    dm.setup("fit")
    dm.setup("test")
    x_test = torch.stack([dm.data_test[i][0] for i in range(args.images)])
    y_test = dm.data_test.labels[: args.images]
    classifier = load_classifier(base_kw["binding_classifier"])

    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
        key = f"{name}@{args.batches}"
        if key in results:
            print(f"{key}: already measured, skipped")
            continue
        what, overrides = VARIANTS[name]
        pl.seed_everything(args.seed, workers=True)
        model = CGANModule(**{**base_kw, **overrides})
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=args.batches, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)
        start = time.perf_counter()
        trainer.fit(model, dm.train_dataloader())
        seconds = time.perf_counter() - start
        report = evaluate_reconstructions(model.encoder, model.generator, classifier, x_test, y_test, base_kw["num_classes"])
        results[key] = {"variant": name, "what": what, "overrides": overrides, "batches": args.batches,
                        "batch_size": data_kw.get("batch_size"), "train_s": round(seconds, 1), **report.as_dict()}
        print(f"{key}: SSIM {report.ssim_mean:.3f}  binding {report.binding:.3f}  ({seconds:.0f} s)")
        atomic_write_text(out_json, json.dumps(results, indent=2) + "\n")

    lines = [f"# cGAN probes on {args.dataset} (`python benchmarks/cgan_probe.py`)", "",
             f"Each run: the config `experiments/{args.dataset}/cgan.yaml` with the overrides shown, "
             f"trained for the given number of batches from seed {args.seed}; scored on the first "
             f"{args.images} test images (SSIM of true-label reconstructions from μ; binding = share of "
             "(image, wrong label) pairs the classifier labels as the wrong label, over all wrong labels).", "",
             "| variant | what | batches | train s | SSIM | MSE | binding | true-label acc. |",
             "|---|---|---|---|---|---|---|---|"]
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    for r in results.values():
        lines.append(f"| {r['variant']} | {r['what']} | {r['batches']} | {r['train_s']} | {fmt(r['ssim_mean'], '.3f')} | "
                     f"{fmt(r['mse_mean'], '.4f')} | {fmt(r['binding'], '.3f')} | {fmt(r['true_label_accuracy'], '.3f')} |")
    atomic_write_text(out_json.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

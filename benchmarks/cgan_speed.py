"""cGAN training speed: float32 vs bf16-mixed, with and without channels-last weights (issue 4).

On a CPU the cGAN's budget is wall time (GTSRB: 90 minutes), so its quality is bounded by the
batches it gets through.  This times Algorithm 1 (``CGANModule.training_step``: G, E, D phases)
under Lightning for each combination, from the dataset's CPU config (``experiments/<ds>/cgan.yaml``)
with its precision and ``channels_last`` overridden, same seed and data order; the first
``--warmup`` batches are not timed.

    python benchmarks/cgan_speed.py --dataset gtsrb            # ~4 minutes on the 2-core CPU

Writes ``benchmarks/results/cgan_speed_<dataset>.{json,md}``.
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
from mixdefense.io import atomic_write_text  # noqa: E402

#: name → (trainer precision, channels_last)
SETTINGS = {"fp32": ("32-true", False), "fp32 + channels-last": ("32-true", True),
            "bf16-mixed": ("bf16-mixed", False), "bf16-mixed + channels-last": ("bf16-mixed", True)}


class BatchTimer(pl.Callback):
    """Wall time of the batches after the first ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.batches = warmup, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.batches += 1
            self.seconds = time.perf_counter() - self.start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gtsrb", choices=sorted(DATAMODULES))
    ap.add_argument("--batches", type=int, default=40, help="timed batches per setting")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if args.batches < 1 or args.warmup < 0:
        ap.error("--batches must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"experiments/{args.dataset}/cgan.yaml"), resolve=True)
    model_kw = dict(cfg["model"]["init_args"])
    dm = DATAMODULES[args.dataset](**cfg["data"]["init_args"])
    dm.setup("fit")
    rows = {}
    for name, (precision, channels_last) in SETTINGS.items():
        pl.seed_everything(0, workers=True)
        model = CGANModule(**{**model_kw, "channels_last": channels_last})
        timer = BatchTimer(args.warmup)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=args.warmup + args.batches, limit_val_batches=0,
                             logger=False, enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, accelerator="cpu", devices=1, precision=precision,
                             callbacks=[timer])
        trainer.fit(model, dm.train_dataloader())
        rows[name] = {"precision": precision, "channels_last": channels_last, "batches": timer.batches,
                      "seconds": round(timer.seconds, 2), "batches_per_s": round(timer.batches / timer.seconds, 3)}
        print(f"{name:28s} {rows[name]['batches_per_s']:.2f} batches/s", flush=True)

    base = rows["fp32"]["batches_per_s"]
    out = ROOT / f"benchmarks/results/cgan_speed_{args.dataset}"
    atomic_write_text(out.with_suffix(".json"), json.dumps({"threads": args.threads, "batch_size": dm.batch_size,
                                                             "settings": rows}, indent=2) + "\n")
    lines = [f"# cGAN training speed on {args.dataset} (`python benchmarks/cgan_speed.py --dataset {args.dataset}`)", "",
             f"`experiments/{args.dataset}/cgan.yaml`, batch {dm.batch_size}, {args.threads} threads, "
             f"{args.batches} timed batches after {args.warmup}.", "",
             "| setting | batches/s | vs fp32 |", "|---|---|---|"]
    lines += [f"| {name} | {r['batches_per_s']:.2f} | {r['batches_per_s'] / base:.2f}x |" for name, r in rows.items()]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

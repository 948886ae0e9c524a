"""The one entry point: ``mixdefense <command> ...``.

* ``mixdefense fit|validate|test|predict --config experiments/<dataset>/<stage>.yaml`` —
  a LightningCLI (subclass mode: the YAML names the LightningModule and the DataModule by
  ``class_path``; OmegaConf parser mode, so configs may interpolate ``${...}``).
* ``mixdefense <tool> ...`` — the framework's own tools (``mixdefense --help`` lists them).

This module is the only part of :mod:`mixdefense` that imports Lightning, ``datamodules``
and ``lightning_modules``; it does so lazily, inside the commands.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from mixdefense.splits import check_disjoint_from_holdout, holdout_range

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def load_images(dataset: str, split: str, n: int | None = None, seed: int = 0, data_root: str | None = None,
                image_size: int | None = None):
    """``(x float [N, C, H, W] in [0, 1], y int64 [N])`` of a dataset split, via its datamodule.

    See :func:`load_calibration_images` for the same images with a record of where they came from.

    ``split="train"`` draws ``n`` images of the whole training set in a seeded random order;
    ``split="val"`` takes the first ``n`` images of the validation split the training
    configs hold out (``val_fraction=0.1``, seed 0: never trained on);
    ``split="test"`` takes the first ``n`` test images (all when ``n`` is None);
    ``split="holdout"`` takes the *last* ``n`` test images, a calibration hold-out for data
    whose validation split is not new to the models (GTSRB's random validation images come
    from the training sequences); evaluations take the first test images, and
    :func:`holdout_range` says where the hold-out starts so that they can refuse to overlap it.
    ``image_size`` resizes (every datamodule takes it; None keeps the dataset's default size).
    """
    x, y, _ = _load_split(dataset, split, n, seed, data_root, image_size)
    return x, y


def load_calibration_images(dataset: str, split: str, n: int, data_root: str | None = None):
    """``(x, y, source)``: ``n`` clean calibration images of ``split`` (``"val"`` or ``"holdout"``).

    ``source`` is the record a calibration keeps of them: ``{"split": "val"}`` or
    ``{"split": "holdout", "test_indices": [start, end]}`` (:mod:`mixdefense.splits`).
    """
    if split not in ("val", "holdout"):
        raise ValueError(f"calibration split must be 'val' or 'holdout', got {split!r}")
    return _load_split(dataset, split, n, 0, data_root, None)


def _load_split(dataset: str, split: str, n: int | None, seed: int, data_root: str | None, image_size: int | None):
    import torch

    from datamodules import DATAMODULES

    if dataset not in DATAMODULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATAMODULES)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be None (all images) or >= 1, got {n}")
    dm = DATAMODULES[dataset](data_root=data_root, val_fraction=0.1 if split == "val" else 0.0,
                              **({"image_size": image_size} if image_size else {}))
    if split == "val":
        dm.setup("fit")
        images, labels = dm.data_val.images[:n], dm.data_val.labels[:n]
    elif split == "train":
        dm.setup("fit")
        images, labels = dm.data_train.images, dm.data_train.labels
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        images, labels = images[order], labels[order]
    elif split == "test":
        dm.setup("test")
        images, labels = dm.data_test.images[:n], dm.data_test.labels[:n]
    elif split == "holdout":
        dm.setup("test")
        start, end = holdout_range(len(dm.data_test.labels), n)
        images, labels = dm.data_test.images[start:end], dm.data_test.labels[start:end]
        return images.float() / 255, labels, {"split": split, "test_indices": [start, end]}
    else:
        raise ValueError(f"split must be 'train', 'val', 'test' or 'holdout', got {split!r}")
    return images.float() / 255, labels, {"split": split}


def _saec(argv: list[str]) -> int:
    from mixdefense import saec_report

    return saec_report.main(argv, load_images=load_images)


def _cgan(argv: list[str]) -> int:
    from mixdefense import cgan_report

    return cgan_report.main(argv, load_images=load_images)


def _contranet(argv: list[str]) -> int:
    from mixdefense import contranet_report

    return contranet_report.main(argv, load_images=load_images, load_calibration=load_calibration_images)


def _adaptive(argv: list[str]) -> int:
    from mixdefense import adaptive_report

    return adaptive_report.main(argv, load_images=load_images, load_calibration=load_calibration_images)


def _baselines(argv: list[str]) -> int:
    from mixdefense import baselines_report

    return baselines_report.main(argv, load_calibration=load_calibration_images, load_images=load_images)


def _bundle(argv: list[str]) -> int:
    """``mixdefense bundle --dataset ds``: one detector file from the trained parts, checked on clean test images."""
    import argparse
    import json

    from mixdefense.classifiers import load_classifier
    from mixdefense.contranet import load_contranet
    from mixdefense.pipeline import MixDefense, load_detector, save_bundle
    from mixdefense.saec import load_saec

    ap = argparse.ArgumentParser(prog="mixdefense bundle", description=_bundle.__doc__)
    ap.add_argument("--dataset", required=True, choices=["mnist", "cifar10", "gtsrb"])
    ap.add_argument("--parts", default=None, help="folder of classifier.pt, saec.pt, contranet.pt (default artifacts/<ds>)")
    ap.add_argument("--out", default=None, help="bundle path (default <parts>/detector.pt)")
    ap.add_argument("--check-images", type=int, default=1000, help="clean test images for the check (0: none)")
    ap.add_argument("--contranet-frr", type=float, default=None,
                    help="recalibrate ContraNet at this clean false-rejection rate on --calibration-split images "
                         "(default: keep contranet.pt's thresholds)")
    ap.add_argument("--calibration-images", type=int, default=2000, help="clean images for --contranet-frr")
    ap.add_argument("--calibration-split", choices=("val", "holdout"), default="val",
                    help="where --contranet-frr's images come from: the validation split or the last test images")
    args = ap.parse_args(argv)
    parts = args.parts or f"artifacts/{args.dataset}"
    out = args.out or f"{parts}/detector.pt"
    classifier, contranet = load_classifier(f"{parts}/classifier.pt"), load_contranet(f"{parts}/contranet.pt")
    record = {"dataset": args.dataset, "parts": parts}
    if args.contranet_frr is not None:
        x_cal, _, source = load_calibration_images(args.dataset, args.calibration_split, args.calibration_images)
        record["contranet_calibration"] = {
            **contranet.calibrate(x_cal, classifier.predict(x_cal), args.contranet_frr).as_dict(), **source}
    detector = MixDefense(classifier, [load_saec(f"{parts}/saec.pt"), contranet])
    if args.check_images:
        check_disjoint_from_holdout(record.get("contranet_calibration", {}), args.check_images)
        x, y = load_images(args.dataset, "test", args.check_images)
        verdict = load_detector(save_bundle(detector, out, **record)).detect(x)
        plain = detector.classifier(x).argmax(1) == y
        record["clean_check"] = {
            "images": len(y), "accuracy_classifier": plain.float().mean().item(),
            "accuracy_with_defense": ((verdict.labels == y) & ~verdict.rejected).float().mean().item(),
            "false_rejection": verdict.rejected.float().mean().item(),
            "rejected_by": verdict.caught_by(),
        }
    path = save_bundle(detector, out, **record)
    print(json.dumps({"bundle": str(path), "size_mb": round(path.stat().st_size / 1e6, 2), **record}, indent=2))
    return 0


def _detect(argv: list[str]) -> int:
    from mixdefense import detect_cli

    return detect_cli.main(argv)


def _tools() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    return {
        "adaptive": (_adaptive, "adaptive white-box attacks on the whole pipeline (PGD, full adaptive, Orthogonal PGD) and the paper's §6 case studies"),
        "detect": (_detect, "run a detector bundle on image files / folders / .pt tensors: label, accepted or rejected by which layer"),
        "baselines": (_baselines, "calibrate the baseline detectors (Feature Squeezing, MagNet) on clean validation images"),
        "bundle": (_bundle, "assemble the detector bundle (classifier + SAEC + ContraNet) and check it on clean images"),
        "cgan": (_cgan, "evaluate a trained cGAN: faithfulness (SSIM) and label binding, Figure-8 grid"),
        "contranet": (_contranet, "calibrate the ContraNet detector (cGAN + metric model) and evaluate it against attacks"),
        "saec": (_saec, "calibrate SAEC on uniform noise / evaluate it against attacks (experiments/<ds>/saec.yaml)"),
    }


CKPT_KEYWORDS = ("last", "best", "hpc", "registry", "null", "None", "")  # Lightning's names, not files


def check_ckpt_path(args: Sequence[str]) -> None:
    """Stop at once (exit 2, one message) when ``--ckpt_path`` names a missing file or one that
    ``torch.load(weights_only=True)`` refuses, before LightningCLI builds a model or reads data."""
    from mixdefense.io import load_plain

    paths = [b for a, b in zip(args, args[1:]) if a == "--ckpt_path"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")]
    for path in paths:
        if path in CKPT_KEYWORDS or "://" in path:
            continue
        try:
            load_plain(path, "checkpoint (--ckpt_path)", mmap=True)
        except (FileNotFoundError, ValueError) as err:
            print(f"mixdefense {args[0]}: {err}", file=sys.stderr)
            raise SystemExit(2) from None


def run_lightning_cli(args: Sequence[str]):
    """Run a LightningCLI subcommand over any LightningModule / LightningDataModule."""
    check_ckpt_path(list(args))
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    import datamodules  # noqa: F401  (makes their class paths importable by short name)
    import lightning_modules  # noqa: F401

    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},  # a typo is an error, not a prefix match
        save_config_kwargs={"overwrite": True},
        args=list(args),
    )


def _usage() -> str:
    lines = [
        "usage: mixdefense {fit,validate,test,predict} --config experiments/<dataset>/<stage>.yaml [overrides]",
        "       mixdefense <tool> [options]",
        "",
        "Lightning commands (LightningCLI; `mixdefense fit --help` for all options):",
        "  fit, validate, test, predict",
        "",
        "Tools:",
    ]
    lines += [f"  {name:<18} {doc}" for name, (_, doc) in sorted(_tools().items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    # W&B never needs a network or an account here: offline unless the user says otherwise.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command = args[0]
    if command in LIGHTNING_COMMANDS:
        run_lightning_cli(args)
        return 0
    tools = _tools()
    if command in tools:
        return int(tools[command][0](args[1:]) or 0)
    print(f"mixdefense: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The one entry point: ``mixdefense <command> ...``.

* ``mixdefense fit|validate|test|predict --config experiments/common/trainer.yaml --config
  experiments/common/loggers.yaml --config experiments/<dataset>/<stage>.yaml`` — a LightningCLI
  (subclass mode: the YAML names the LightningModule and the DataModule by ``class_path``;
  OmegaConf parser mode, so configs may interpolate ``${...}``; later ``--config`` files override
  earlier ones; each stage file's header gives its exact command).
* ``mixdefense <tool> ...`` — the framework's own tools (``mixdefense --help`` lists them).

This module is the only part of :mod:`mixdefense` that imports Lightning, ``datamodules``
and ``lightning_modules``; it does so lazily, inside the commands.  The tools live in
:mod:`mixdefense.commands`; they reach the data through the loaders defined here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from mixdefense import splits as _splits

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def load_images(dataset: str, split: str, n: int | None = None, seed: int = 0, data_root: str | None = None,
                image_size: int | None = None):
    """``(x float [N, C, H, W] in [0, 1], y int64 [N])`` of a dataset split, via its datamodule.

    See :func:`load_calibration_images` for calibration images with a record of where they came from.

    ``split="train"`` draws ``n`` images of the whole training set in a seeded random order;
    ``split="val"`` takes the first ``n`` images of the validation split the training
    configs hold out (``val_fraction=0.1``, seed 0: never trained on); ``"val_groups"`` the same
    share held out as whole groups (GTSRB: sign tracks; ``val_grouping="groups"``);
    ``"test"``, ``"selection"`` and ``"test_calibration"`` take the first ``n`` images of the
    protocol's test, selection and test-set calibration splits (:mod:`mixdefense.splits`; the
    test split is what results report, the selection split is where choices are made);
    ``"test_all"`` the first ``n`` of the whole test set.
    ``image_size`` resizes (every datamodule takes it; None keeps the dataset's default size).
    """
    return _load_split(dataset, split, n, seed, data_root, image_size)


def load_calibration_images(dataset: str, split: str, n: int, data_root: str | None = None):
    """``(x, y, source)``: ``n`` clean calibration images of ``split`` (``"val"``, ``"val_groups"`` or ``"test_calibration"``).

    ``source`` is the record a calibration keeps of them: ``{"split": "val"}`` or
    ``{"split": "test_calibration", "test_indices": [...]}`` (:mod:`mixdefense.splits`).
    """
    from datamodules import DATAMODULES

    if dataset not in DATAMODULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATAMODULES)}")
    if split not in CALIBRATION_SPLITS:
        raise ValueError(f"calibration split must be one of {CALIBRATION_SPLITS}, got {split!r}")
    return DATAMODULES[dataset](data_root=data_root).calibration_data(split, n)


#: the calibration splits :func:`load_calibration_images` knows
CALIBRATION_SPLITS = _splits.CALIBRATION_SPLITS
_TEST_SPLITS = {"test": "test", "selection": "selection", "test_calibration": "calibration", "test_all": "all"}


def _load_split(dataset: str, split: str, n: int | None, seed: int, data_root: str | None, image_size: int | None):
    import torch

    from datamodules import DATAMODULES

    if dataset not in DATAMODULES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATAMODULES)}")
    if n is not None and n < 1:
        raise ValueError(f"n must be None (all images) or >= 1, got {n}")
    if split not in ("train", "val", "val_groups", *_TEST_SPLITS):
        raise ValueError(f"split must be one of {('train', 'val', 'val_groups', *_TEST_SPLITS)}, got {split!r}")
    dm = DATAMODULES[dataset](data_root=data_root, val_fraction=0.1 if split.startswith("val") else 0.0,
                              val_grouping="groups" if split == "val_groups" else "random",
                              test_split=_TEST_SPLITS.get(split, "test"), **({"image_size": image_size} if image_size else {}))
    if split.startswith("val"):
        dm.setup("fit")
        images, labels = dm.data_val.images[:n], dm.data_val.labels[:n]
    elif split == "train":
        dm.setup("fit")
        images, labels = dm.data_train.images, dm.data_train.labels
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
        images, labels = images[order], labels[order]
    else:
        dm.setup("test")
        images, labels = dm.data_test.images[:n], dm.data_test.labels[:n]
    return images.float() / 255, labels


def dataset_names() -> list[str]:
    """The registered datasets (the keys of ``datamodules.DATAMODULES``)."""
    from datamodules import DATAMODULES

    return sorted(DATAMODULES)


def _data():
    from mixdefense.commands import Data

    return Data(datasets=dataset_names(), load_images=load_images, load_calibration=load_calibration_images)


def _command(module: str) -> Callable[[list[str]], int]:
    """``mixdefense.commands.<module>.main(argv, data)``, imported when the command runs."""

    def run(argv: list[str]) -> int:
        import importlib

        main_ = importlib.import_module(f"mixdefense.commands.{module}").main
        return main_(argv) if module in _NO_DATA else main_(argv, _data())

    return run


_NO_DATA = ("detect", "results_index")


def _tools() -> dict[str, tuple[Callable[[list[str]], int], str]]:
    return {
        "adaptive": (_command("adaptive"), "adaptive white-box attacks on the whole pipeline (PGD, full adaptive, Orthogonal PGD) and the paper's §6 case studies"),
        "detect": (_command("detect"), "run a detector bundle on image files / folders / .pt tensors: label, accepted or rejected by which layer"),
        "baselines": (_command("baselines"), "calibrate the baseline detectors (Feature Squeezing, MagNet) at the dataset's operating point"),
        "bundle": (_command("bundle"), "assemble the detector bundle (classifier + SAEC + ContraNet), calibrate, check; records the parts' hashes"),
        "cgan": (_command("cgan"), "evaluate a trained cGAN: faithfulness (SSIM) and label binding, Figure-8 grid"),
        "contranet": (_command("contranet"), "calibrate the ContraNet detector (cGAN + metric model) and evaluate it against attacks"),
        "results-index": (_command("results_index"), "write results/INDEX.md from every results/**/run.json record (--check: verify it)"),
        "saec": (_command("saec"), "calibrate SAEC on uniform noise / evaluate it against attacks (experiments/<ds>/saec.yaml)"),
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


#: Lightning commands whose output is a report: the libraries' notices stay out of it
QUIET_COMMANDS = ("test", "predict")


def quiet_libraries() -> None:
    """Keep Lightning's info lines (accelerator notices, tips) and library deprecation/future warnings off
    the screen; warnings that concern the user's run still show.  ``MIXDEFENSE_VERBOSE=1`` keeps them all."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)`.*")


def run_lightning_cli(args: Sequence[str]):
    """Run a LightningCLI subcommand over any LightningModule / LightningDataModule."""
    check_ckpt_path(list(args))
    import warnings

    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    args = list(args)
    if args and args[0] in QUIET_COMMANDS and not os.environ.get("MIXDEFENSE_VERBOSE"):
        quiet_libraries()
        args.insert(1, "--verbose=false")  # the report prints its own table (a config or a later flag may say otherwise)

    import datamodules  # noqa: F401  (makes their class paths importable by short name)
    import lightning_modules  # noqa: F401

    # `args` repeats sys.argv[1:] when run from the shell (LightningCLI warns about that); sys.argv itself
    # must stay as it is: DDP's launcher starts the other processes with it
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "allow_abbrev": False},  # a typo is an error, not a prefix match
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def _usage() -> str:
    lines = [
        "usage: mixdefense {fit,validate,test,predict} --config experiments/common/trainer.yaml --config experiments/common/loggers.yaml\n"
        "                 --config experiments/<dataset>/<stage>.yaml [overrides]   (each stage file's header gives its command)",
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

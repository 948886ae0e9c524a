"""The ``mixdefense <tool>`` commands, one module each, every one with ``main(argv, data) -> int``.

They are thin: argument parsing, loading, calling the core, writing reports.  Datasets come in
through :class:`Data`, which :mod:`mixdefense.cli` builds from the datamodule registry (the core
never imports the datamodules).  A dataset's operating point (where ContraNet's and the baselines'
thresholds come from, at which clean false-rejection rate) is read from
``experiments/<dataset>/detector.yaml`` (:func:`operating_point`), so a command called directly
gives what ``make`` gives.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixdefense import splits as _splits

#: defaults of :func:`operating_point` for a dataset without ``experiments/<ds>/detector.yaml``
OPERATING_POINT_DEFAULTS: dict[str, Any] = {
    "calibration_split": "val", "target_frr": 0.01, "report_frrs": [0.01, 0.05], "calibration_images": 2000}
CALIBRATION_SPLITS = _splits.CALIBRATION_SPLITS


@dataclass(frozen=True)
class Data:
    """How a command reaches the datasets.

    ``datasets``: the registered dataset names (the datamodule registry's keys);
    ``load_images(dataset, split, n=None, seed=0, image_size=None) -> (x [N, C, H, W] in [0, 1], y [N])``;
    ``load_calibration(dataset, split, n) -> (x, y, source record)`` (``mixdefense.cli`` documents both).
    """

    datasets: Sequence[str]
    load_images: Callable[..., Any]
    load_calibration: Callable[..., Any]

    def add_dataset_argument(self, parser: argparse.ArgumentParser, required: bool = True) -> None:
        """``--dataset`` with the registered names as choices."""
        parser.add_argument("--dataset", required=required, choices=sorted(self.datasets),
                            help="a registered dataset (datamodules.DATAMODULES)")


def operating_point(dataset: str, config: str | Path | None = None) -> dict[str, Any]:
    """The dataset's operating point: ``{calibration_split, target_frr, report_frrs, calibration_images}``.

    ``target_frr``: the clean false-rejection rate every shipped detector (the composite, Feature
    Squeezing, MagNet) is calibrated at, on the *correctly classified* images among the first
    ``calibration_images`` of ``calibration_split``; ``report_frrs``: the rates evaluations report at.

    Read from ``config`` (default ``experiments/<dataset>/detector.yaml``); a dataset without that
    file gets :data:`OPERATING_POINT_DEFAULTS`.  Unknown keys and out-of-range values are errors.
    """
    import yaml

    path = Path(config) if config is not None else Path("experiments") / dataset / "detector.yaml"
    if not path.exists():
        if config is not None:
            raise FileNotFoundError(f"operating-point config not found: {path}")
        return {**OPERATING_POINT_DEFAULTS, "source": "defaults"}
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of {sorted(OPERATING_POINT_DEFAULTS)}")
    unknown = set(values) - set(OPERATING_POINT_DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(OPERATING_POINT_DEFAULTS)}")
    op = {**OPERATING_POINT_DEFAULTS, **values}
    if op["calibration_split"] not in CALIBRATION_SPLITS:
        raise ValueError(f"{path}: calibration_split must be one of {CALIBRATION_SPLITS}, got {op['calibration_split']!r}")
    rates = op["report_frrs"] if isinstance(op["report_frrs"], list) and op["report_frrs"] else [None]
    for key, value in (("target_frr", op["target_frr"]), *(("report_frrs", r) for r in rates)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{path}: {key} must be a rate in (0, 1) (report_frrs: a non-empty list of them), got {value!r}")
    if not isinstance(op["calibration_images"], int) or op["calibration_images"] < 1:
        raise ValueError(f"{path}: calibration_images must be a positive integer, got {op['calibration_images']!r}")
    return {**op, "source": str(path)}

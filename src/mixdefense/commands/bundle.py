"""``mixdefense bundle --dataset ds``: one detector file from the trained parts, checked on clean test images.

The parts are ``classifier.pt``, ``saec.pt`` and ``contranet.pt`` in ``--parts`` (default
``artifacts/<ds>``).  ContraNet's threshold is set at the dataset's operating point
(``experiments/<ds>/detector.yaml``): the composite (SAEC's noise-calibrated threshold and
ContraNet's together) rejects ``target_frr`` of the *correctly classified* images among the first
``calibration_images`` of ``calibration_split`` (:func:`mixdefense.calibration.calibrate_composite`);
``--keep-thresholds`` keeps ``contranet.pt``'s own.  ``--contrast-labels k --contrast-weight w``
turn on MixDefense+'s runner-up contrast of ContraNet's score (:mod:`mixdefense.layers.contranet`;
default: as in ``contranet.pt``, the paper's score for a trained part).  The bundle records the
sha256 of every part, the operating point and the command, so it can be rebuilt from the parts
beside it and checked against them (:func:`check_parts`).

The bundle goes to ``--out``, by default ``artifacts/candidates/<ds>/detector.pt``: shipping a
detector is explicit (``--out artifacts/<ds>/detector.pt``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixdefense.commands import Data, operating_point
from mixdefense.commands.results_index import sha256_file
from mixdefense.io import check_calibration_held_out

PARTS = ("classifier.pt", "saec.pt", "contranet.pt")


def check_parts(bundle_record: dict, parts_dir: str | Path) -> list[str]:
    """The parts whose file in ``parts_dir`` differs from the hash the bundle recorded (``[]``: all match).

    A bundle without recorded hashes fails for every part (it cannot be traced to its parts).
    """
    recorded = bundle_record.get("part_sha256", {})
    return [name for name in PARTS
            if name not in recorded or not (Path(parts_dir) / name).is_file()
            or sha256_file(Path(parts_dir) / name) != recorded[name]]


def build(dataset: str, data: Data, parts: Path, out: Path, keep_thresholds: bool, check_images: int,
          config: str | None = None, command: str = "", contrast_labels: int | None = None,
          contrast_weight: float | None = None) -> dict:
    """Assemble, calibrate, check and write the bundle; returns its record.

    ``contrast_labels`` / ``contrast_weight``: ContraNet's runner-up contrast (``None``: keep the part's)."""
    from mixdefense.classifiers import load_classifier
    from mixdefense.layers import SAEC, ContraNet
    from mixdefense.pipeline import MixDefense, load_detector, save_bundle
    from mixdefense.calibration import calibrate_composite

    missing = [n for n in PARTS if not (parts / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{parts}: missing part(s) {missing} (train them first, see docs/training.md)")
    classifier, contranet = load_classifier(parts / "classifier.pt"), ContraNet.load(parts / "contranet.pt")
    contrast = (contrast_labels if contrast_labels is not None else contranet.contrast_labels,
                contrast_weight if contrast_weight is not None else contranet.contrast_weight)
    if contrast != (contranet.contrast_labels, contranet.contrast_weight):
        if keep_thresholds:
            raise ValueError("--keep-thresholds with another contrast: contranet.pt's thresholds are for its own score "
                             f"(contrast_labels={contranet.contrast_labels}, contrast_weight={contranet.contrast_weight})")
        contranet = ContraNet.from_payload({**contranet.payload(), "contrast_labels": contrast[0],
                                            "contrast_weight": contrast[1], "thresholds": contranet.thresholds.clone().fill_(float("inf")),
                                            "calibration": None})
    record: dict = {"dataset": dataset, "parts": str(parts), "part_sha256": {n: sha256_file(parts / n) for n in PARTS},
                    "command": command, "contranet_contrast": {"labels": contrast[0], "weight": contrast[1]}}
    detector = MixDefense(classifier, [SAEC.load(parts / "saec.pt"), contranet])
    if not keep_thresholds:
        op = operating_point(dataset, config)
        check_calibration_held_out(op["calibration_split"], {"ContraNet": parts / "contranet.pt"})
        x_cal, y_cal, source = data.load_calibration(dataset, op["calibration_split"], op["calibration_images"])
        record["operating_point"] = op
        record["contranet_calibration"] = {**calibrate_composite(detector, x_cal, y_cal, op["target_frr"]), **source}
    if check_images:  # the first images of the protocol's test split: never calibration images
        x, y = data.load_images(dataset, "test", check_images)
        verdict = load_detector(save_bundle(detector, out, **record)).detect(x)
        plain = detector.classifier(x).argmax(1) == y
        record["clean_check"] = {
            "images": len(y), "accuracy_classifier": plain.float().mean().item(),
            "accuracy_with_defense": ((verdict.labels == y) & ~verdict.rejected).float().mean().item(),
            "false_rejection": verdict.rejected.float().mean().item(),
            "rejected_by": verdict.caught_by(),
        }
    save_bundle(detector, out, **record)
    return record


def main(argv: list[str], data: Data) -> int:
    ap = argparse.ArgumentParser(prog="mixdefense bundle", description=__doc__.split("\n\n")[0],
                                 epilog="Operating point: experiments/<ds>/detector.yaml (--config to use another).")
    data.add_dataset_argument(ap)
    ap.add_argument("--parts", default=None, help="folder of classifier.pt, saec.pt, contranet.pt (default artifacts/<ds>)")
    ap.add_argument("--out", default=None, help="bundle path (default artifacts/candidates/<ds>/detector.pt)")
    ap.add_argument("--config", default=None, help="operating-point file (default experiments/<ds>/detector.yaml)")
    ap.add_argument("--keep-thresholds", action="store_true", help="keep contranet.pt's thresholds (no recalibration)")
    ap.add_argument("--check-images", type=int, default=1000, help="clean test images for the check (0: none)")
    ap.add_argument("--contrast-labels", type=int, default=None,
                    help="ContraNet contrasts its label with the classifier's k-1 runner-ups (MixDefense+; 1: the paper's "
                         "score; default: as in contranet.pt)")
    ap.add_argument("--contrast-weight", type=float, default=None,
                    help="the runner-ups' weight w in the contrast (default: as in contranet.pt)")
    args = ap.parse_args(argv)
    parts = Path(args.parts or f"artifacts/{args.dataset}")
    out = Path(args.out or f"artifacts/candidates/{args.dataset}/detector.pt")
    command = " ".join(["mixdefense", "bundle", *argv])
    record = build(args.dataset, data, parts, out, args.keep_thresholds, args.check_images, args.config, command,
                   args.contrast_labels, args.contrast_weight)
    print(json.dumps({"bundle": str(out), "size_mb": round(out.stat().st_size / 1e6, 2), **record}, indent=2))
    return 0

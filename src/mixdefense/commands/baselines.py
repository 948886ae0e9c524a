"""``mixdefense baselines calibrate``: the baseline detectors (Feature Squeezing, MagNet), calibrated on clean images.

For a dataset, from its trained parts in ``--parts`` (default ``artifacts/<ds>/``), written to
``--out-parts`` (default ``artifacts/candidates/<ds>/``: a shipped file is replaced only when asked):

* Feature Squeezing (:mod:`mixdefense.layers.squeezing`; no training) with the dataset's squeezers
  (:data:`SQUEEZERS`) → ``feature_squeezing.pt``;
* MagNet (:mod:`mixdefense.layers.magnet`) on the autoencoder ``magnet_ae.pt`` (``make train-magnet``)
  with the dataset's detectors (:data:`MAGNET_DETECTORS`) → ``magnet.pt``.

Thresholds come from the *correctly classified* clean images of the dataset's calibration split
(never trained on; never attacks) at its ``target_frr`` (``experiments/<ds>/detector.yaml``, the rate the
shipped composite is calibrated at); the achieved clean rejection on those images and on test images, and the clean accuracy of MagNet's reformer, go to
``--out`` (default ``runs/<ds>/baselines/calibration.json``).  Madry adversarial training is trained, not
calibrated (``make train-madry``); its clean accuracy is reported here when ``madry.pt`` exists.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from mixdefense.calibration import calibration_record
from mixdefense.classifiers import load_classifier
from mixdefense.commands import CALIBRATION_SPLITS, Data, operating_point
from mixdefense.io import atomic_write_text, check_calibration_held_out
from mixdefense.layers.magnet import MagNet, load_autoencoder
from mixdefense.layers.squeezing import FeatureSqueezing

#: Squeezers per dataset: Xu et al.'s detectors, MNIST 1-bit depth + 2×2 median, CIFAR-10 5-bit depth +
#: 2×2 median + non-local means 13-3-2 (search window 13, patch 3, h = 2).  GTSRB is not in their paper:
#: it uses the CIFAR-10 configuration (colour images of the same 32×32 size).
SQUEEZERS = {"mnist": ("bits:1", "median:2"), "cifar10": ("bits:5", "median:2", "nlm:13-3-2"),
             "gtsrb": ("bits:5", "median:2", "nlm:13-3-2")}
#: MagNet detectors per dataset (Meng & Chen: reconstruction errors on MNIST; L1 + JSD at T = 10, 40 on colour).
MAGNET_DETECTORS = {"mnist": ("l1", "l2"), "cifar10": ("l1", "jsd:10", "jsd:40"), "gtsrb": ("l1", "jsd:10", "jsd:40")}


def _rejection(layer, x: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        return torch.cat([layer(xb).cpu() for xb in x.split(batch_size)]).float().mean().item()


def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        return torch.cat([predict(xb).cpu() for xb in x.split(batch_size)]).eq(y).float().mean().item()


def calibrate_baselines(dataset: str, parts: Path, data: Data, frr: float, calibration_images: int, test_images: int,
                        calibration_split: str = "val", out_parts: Path | None = None) -> dict:
    """Calibrate and save the baseline layers of ``dataset``; the report as a dict.

    ``calibration_split`` is ``"val"``, ``"val_groups"`` (then MagNet's autoencoder must have been trained
    with ``val_grouping: groups``) or ``"test_calibration"`` (:mod:`mixdefense.splits`; the clean checks
    take the first ``test_images`` of the protocol's test split, disjoint from all three).
    Only the correctly classified calibration images set the thresholds.
    The calibrated layers are written to ``out_parts`` (default: ``parts``).
    """
    out_parts = out_parts or parts
    classifier = load_classifier(parts / "classifier.pt")
    x_all, y_all, source = data.load_calibration(dataset, calibration_split, calibration_images)
    pred = classifier.predict(x_all)
    x_val = x_all[pred == y_all]
    x_test, y_test = data.load_images(dataset, "test", test_images)
    report: dict = {"dataset": dataset, "target_frr": frr, "calibration_images": len(x_val),
                    "calibration_source": {**source, **calibration_record(y_all, pred)},
                    "test_images": len(x_test),
                    "classifier_test_accuracy": _accuracy(lambda x: classifier(x).argmax(1), x_test, y_test)}

    if dataset not in SQUEEZERS:
        raise ValueError(f"no baseline settings for {dataset!r}; add it to SQUEEZERS and MAGNET_DETECTORS ({sorted(SQUEEZERS)})")
    fs = FeatureSqueezing(SQUEEZERS[dataset], classifier)
    cal = fs.calibrate(x_val, frr)
    fs.save(out_parts / "feature_squeezing.pt", dataset=dataset)
    report["feature_squeezing"] = {"file": str(out_parts / "feature_squeezing.pt"), "squeezers": fs.squeezers, **cal.as_dict(),
                                   "test_clean_rejection": _rejection(fs, x_test)}

    ae_path = parts / "magnet_ae.pt"
    if ae_path.exists():
        check_calibration_held_out(calibration_split, {"MagNet's autoencoder": ae_path})
        magnet = MagNet(load_autoencoder(ae_path), MAGNET_DETECTORS[dataset], classifier)
        mcal = magnet.calibrate(x_val, frr)
        magnet.save(out_parts / "magnet.pt", dataset=dataset, autoencoder=str(ae_path))
        report["magnet"] = {"file": str(out_parts / "magnet.pt"), **mcal.as_dict(), "test_clean_rejection": _rejection(magnet, x_test),
                            "reformer_test_accuracy": _accuracy(magnet.reformed_labels, x_test, y_test)}
    else:
        report["magnet"] = f"skipped: {ae_path} not found (make train-magnet DATASET={dataset})"

    madry_path = parts / "madry.pt"
    if madry_path.exists():
        madry = load_classifier(madry_path)
        report["madry"] = {"file": str(madry_path), "test_accuracy": _accuracy(lambda x: madry(x).argmax(1), x_test, y_test)}
    return report


def main(argv: list[str], data: Data) -> int:
    ap = argparse.ArgumentParser(prog="mixdefense baselines", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="calibrate Feature Squeezing and MagNet on clean validation images")
    data.add_dataset_argument(cal)
    cal.add_argument("--parts", default=None, help="folder of classifier.pt, magnet_ae.pt (default artifacts/<ds>)")
    cal.add_argument("--out-parts", default=None, help="where the calibrated layers go (default artifacts/candidates/<ds>)")
    cal.add_argument("--config", default=None, help="operating point (default experiments/<ds>/detector.yaml)")
    cal.add_argument("--frr", type=float, default=None, help="target clean false-rejection rate (default: target_frr)")
    cal.add_argument("--calibration-images", type=int, default=None, help="clean images for the thresholds (default: the operating point's)")
    cal.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default=None,
                     help="the thresholds' images: the validation split (val: single images; val_groups: whole groups such as GTSRB's sign tracks) or the test set's calibration split (mixdefense.splits)")
    cal.add_argument("--test-images", type=int, default=1000, help="test images for the clean checks")
    cal.add_argument("--out", default=None, help="report folder (default runs/<ds>/baselines)")
    args = ap.parse_args(argv)
    parts = Path(args.parts or f"artifacts/{args.dataset}")
    if not (parts / "classifier.pt").exists():
        print(f"mixdefense baselines: {parts / 'classifier.pt'} not found (make train-classifier DATASET={args.dataset})")
        return 2
    op = operating_point(args.dataset, args.config)
    report = calibrate_baselines(args.dataset, parts, data, op["target_frr"] if args.frr is None else args.frr,
                                 args.calibration_images or op["calibration_images"], args.test_images,
                                 args.calibration_split or op["calibration_split"],
                                 Path(args.out_parts or f"artifacts/candidates/{args.dataset}"))
    out = Path(args.out or f"runs/{args.dataset}/baselines")
    atomic_write_text(out / "calibration.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out / 'calibration.json'}")
    return 0

"""``mixdefense baselines calibrate``: the baseline detectors of issue 7, calibrated on clean images.

For a dataset, from its trained parts in ``artifacts/<ds>/``:

* Feature Squeezing (:mod:`mixdefense.squeezing`; no training) with the dataset's squeezers
  (:data:`SQUEEZERS`) → ``feature_squeezing.pt``;
* MagNet (:mod:`mixdefense.magnet`) on the autoencoder ``magnet_ae.pt`` (``make train-magnet``)
  with the dataset's detectors (:data:`MAGNET_DETECTORS`) → ``magnet.pt``.

Thresholds come from clean *validation* images (never trained on; never attacks) at a target
false-rejection rate (default 5 %); the achieved clean rejection on those images and on test
images, and the clean accuracy of MagNet's reformer, go to
``results/<ds>/baselines/calibration.json``.  Madry adversarial training is trained, not
calibrated (``make train-madry``); its clean accuracy is reported here when ``madry.pt`` exists.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from mixdefense.classifiers import load_classifier
from mixdefense.io import atomic_write_text
from mixdefense.magnet import MagNet, load_autoencoder, save_magnet
from mixdefense.splits import check_disjoint_from_holdout
from mixdefense.squeezing import FeatureSqueezing, save_squeezing

#: Squeezers per dataset (Xu et al.: 1-bit depth + 2×2 median for MNIST; 5-bit + 2×2 median for colour).
SQUEEZERS = {"mnist": ("bits:1", "median:2"), "cifar10": ("bits:5", "median:2"), "gtsrb": ("bits:5", "median:2")}
#: MagNet detectors per dataset (Meng & Chen: reconstruction errors on MNIST; L1 + JSD at T = 10, 40 on colour).
MAGNET_DETECTORS = {"mnist": ("l1", "l2"), "cifar10": ("l1", "jsd:10", "jsd:40"), "gtsrb": ("l1", "jsd:10", "jsd:40")}


def _rejection(layer, x: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        return torch.cat([layer(xb).cpu() for xb in x.split(batch_size)]).float().mean().item()


def _accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    with torch.no_grad():
        return torch.cat([predict(xb).cpu() for xb in x.split(batch_size)]).eq(y).float().mean().item()


def calibrate_baselines(dataset: str, parts: Path, load_calibration: Callable, load_images: Callable, frr: float,
                        calibration_images: int, test_images: int, calibration_split: str = "val") -> dict:
    """Calibrate and save the baseline layers of ``dataset``; the report as a dict.

    ``calibration_split`` is ``"val"`` or ``"holdout"`` (the last test images, see
    :mod:`mixdefense.splits`: the clean checks on the first ``test_images`` must stay clear of them);
    ``load_calibration(dataset, split, n) -> (x, y, source)`` (``mixdefense.cli.load_calibration_images``).
    """
    classifier = load_classifier(parts / "classifier.pt")
    x_val, _, source = load_calibration(dataset, calibration_split, calibration_images)
    check_disjoint_from_holdout(source, test_images)
    x_test, y_test = load_images(dataset, "test", test_images)
    report: dict = {"dataset": dataset, "target_frr": frr, "calibration_images": len(x_val), "calibration_source": source,
                    "test_images": len(x_test),
                    "classifier_test_accuracy": _accuracy(lambda x: classifier(x).argmax(1), x_test, y_test)}

    fs = FeatureSqueezing(SQUEEZERS[dataset], classifier)
    cal = fs.calibrate(x_val, frr)
    save_squeezing(fs, parts / "feature_squeezing.pt", dataset=dataset)
    report["feature_squeezing"] = {"file": str(parts / "feature_squeezing.pt"), "squeezers": fs.squeezers, **cal.as_dict(),
                                   "test_clean_rejection": _rejection(fs, x_test)}

    ae_path = parts / "magnet_ae.pt"
    if ae_path.exists():
        magnet = MagNet(load_autoencoder(ae_path), MAGNET_DETECTORS[dataset], classifier)
        mcal = magnet.calibrate(x_val, frr)
        save_magnet(magnet, parts / "magnet.pt", dataset=dataset, autoencoder=str(ae_path))
        report["magnet"] = {"file": str(parts / "magnet.pt"), **mcal.as_dict(), "test_clean_rejection": _rejection(magnet, x_test),
                            "reformer_test_accuracy": _accuracy(magnet.reformed_labels, x_test, y_test)}
    else:
        report["magnet"] = f"skipped: {ae_path} not found (make train-magnet DATASET={dataset})"

    madry_path = parts / "madry.pt"
    if madry_path.exists():
        madry = load_classifier(madry_path)
        report["madry"] = {"file": str(madry_path), "test_accuracy": _accuracy(lambda x: madry(x).argmax(1), x_test, y_test)}
    return report


def main(argv: list[str], load_calibration: Callable, load_images: Callable) -> int:
    ap = argparse.ArgumentParser(prog="mixdefense baselines", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="calibrate Feature Squeezing and MagNet on clean validation images")
    cal.add_argument("--dataset", required=True, choices=sorted(SQUEEZERS))
    cal.add_argument("--parts", default=None, help="folder of classifier.pt, magnet_ae.pt (default artifacts/<ds>)")
    cal.add_argument("--frr", type=float, default=0.05, help="target clean false-rejection rate (default 0.05)")
    cal.add_argument("--calibration-images", type=int, default=2000, help="clean images for the thresholds")
    cal.add_argument("--calibration-split", choices=("val", "holdout"), default="val",
                     help="the thresholds' images: the validation split or the last test images (mixdefense.splits)")
    cal.add_argument("--test-images", type=int, default=1000, help="test images for the clean checks")
    cal.add_argument("--out", default=None, help="report folder (default results/<ds>/baselines)")
    args = ap.parse_args(argv)
    parts = Path(args.parts or f"artifacts/{args.dataset}")
    if not (parts / "classifier.pt").exists():
        print(f"mixdefense baselines: {parts / 'classifier.pt'} not found (make train-classifier DATASET={args.dataset})")
        return 2
    report = calibrate_baselines(args.dataset, parts, load_calibration, load_images, args.frr, args.calibration_images,
                                 args.test_images, args.calibration_split)
    out = Path(args.out or f"results/{args.dataset}/baselines")
    atomic_write_text(out / "calibration.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out / 'calibration.json'}")
    return 0

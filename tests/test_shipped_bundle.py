"""The shipped MNIST detector (issue 9): a plain-weights file that reproduces its recorded clean check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mixdefense
from mixdefense.cli import load_images

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "artifacts/mnist/detector.pt"


def test_shipped_bundle_is_small_and_plain_weights():
    assert BUNDLE.stat().st_size <= 20e6
    payload = torch.load(BUNDLE, map_location="cpu", weights_only=True)  # raises on anything but tensors and plain data
    assert payload["format"] == "mixdefense.detector/1" and {"torch", "mixdefense"} <= set(payload["versions"])
    assert [layer["type"] for layer in payload["layers"]] == ["saec", "contranet"]


def test_shipped_bundle_reproduces_its_recorded_clean_accuracy(data_root):
    detector = mixdefense.load_detector(BUNDLE)
    record = detector.record["clean_check"]
    x, y = load_images("mnist", "test", record["images"], data_root=str(data_root))
    verdict = detector.detect(x)
    accuracy = ((verdict.labels == y) & ~verdict.rejected).float().mean().item()
    plain = (detector.classifier(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(record["accuracy_with_defense"], abs=0.002)  # within 0.2 points
    assert plain == pytest.approx(record["accuracy_classifier"], abs=0.002)
    assert verdict.caught_by() == record["rejected_by"]


def _state(entry: dict) -> dict:
    return entry["state_dict"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "gtsrb"])
def test_shipped_bundle_is_built_from_the_parts_beside_it(dataset):
    """The bundle records the sha256 of its parts, they match the files beside it, and the bundle's
    weights are those files' weights; ContraNet's thresholds are the recorded recalibration at the
    dataset's operating point (experiments/<ds>/detector.yaml): `mixdefense bundle` rebuilds it."""
    from mixdefense.commands import operating_point
    from mixdefense.commands.bundle import check_parts

    parts = REPO / "artifacts" / dataset
    payload = torch.load(parts / "detector.pt", map_location="cpu", weights_only=True)
    record = payload["record"]
    assert check_parts(record, parts) == [], f"artifacts/{dataset}: parts differ from the bundle's record"
    load = lambda name: torch.load(parts / name, map_location="cpu", weights_only=True)  # noqa: E731
    layers = {layer["type"]: layer["payload"] for layer in payload["layers"]}
    assert _equal(_state(payload["classifier"]), _state(load("classifier.pt")))
    assert _equal(layers["saec"]["state_dict"], load("saec.pt")["state_dict"])
    contranet = load("contranet.pt")
    assert _equal(_state(layers["contranet"]["cgan"]), _state(contranet["cgan"]))
    assert _equal(_state(layers["contranet"]["metric"]), _state(contranet["metric"]))
    assert layers["contranet"]["thresholds"].tolist() == pytest.approx(record["contranet_calibration"]["thresholds"])
    op = operating_point(dataset, REPO / "experiments" / dataset / "detector.yaml")
    cal = record["contranet_calibration"]
    assert cal["target_frr"] == op["target_frr"] and cal["composite_frr"] <= op["target_frr"]
    # the correctly classified ones of the operating point's calibration images set the threshold
    assert cal["images"] == op["calibration_images"] and cal["num_images"] == cal["correctly_classified"]
    assert record["contranet_calibration"].get("split", "val") == op["calibration_split"]

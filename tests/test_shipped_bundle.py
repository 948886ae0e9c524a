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

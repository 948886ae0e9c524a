"""The core's import direction and the layer registry (fast, no data)."""

import subprocess
import sys

import pytest
import torch

CORE_MODULES = [
    "mixdefense", "mixdefense.pipeline", "mixdefense.layers", "mixdefense.layers.saec", "mixdefense.layers.contranet",
    "mixdefense.layers.squeezing", "mixdefense.layers.magnet", "mixdefense.attacks", "mixdefense.attacks.adaptive",
    "mixdefense.evaluation.points", "mixdefense.evaluation.curves", "mixdefense.evaluation.sweep",
    "mixdefense.evaluation.baselines", "mixdefense.evaluation.reconstruction", "mixdefense.classifiers",
    "mixdefense.nets", "mixdefense.triplets", "mixdefense.commands.bundle", "mixdefense.commands.detect",
]
ABOVE = ("pytorch_lightning", "lightning", "datamodules", "lightning_modules")


def test_the_core_imports_nothing_above_it():
    """A fresh interpreter imports every core module; neither Lightning nor the datamodules /
    LightningModules get loaded (so no single one of them loads them either)."""
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {CORE_MODULES!r}]; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ABOVE!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing the core loaded {out}"


def test_attack_modules_import_no_plotting_code():
    """Attacks compute; the commands that report draw (the attack modules never import the plots)."""
    code = "import sys, mixdefense.attacks.adaptive, mixdefense.attacks; print('mixdefense.evaluation.plots' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_builtin_layers_are_registered_with_their_kinds():
    from mixdefense.layers import LAYERS

    assert {n: c.kind for n, c in LAYERS.items()} == {
        "saec": "pre", "contranet": "post", "feature_squeezing": "post", "magnet": "post"}


def test_a_new_layer_is_subclass_and_register(tmp_path):
    """A layer defined outside the package goes into a bundle, back out of it, and into the pipeline."""
    from mixdefense.classifiers import Classifier
    from mixdefense.layers import DetectorLayer, register_layer
    from mixdefense.pipeline import MixDefense, load_detector, save_bundle

    @register_layer
    class Brightness(DetectorLayer):
        """Rejects images brighter than a threshold (a test layer)."""

        type_name, file_format, kind = "test_brightness", "test.brightness/1", "pre"

        def __init__(self, threshold: float = 0.5):
            super().__init__()
            self.register_buffer("threshold", torch.tensor(float(threshold)))

        @property
        def calibrated(self):
            return True

        def score(self, x, y=None):
            return x.flatten(1).mean(1)

        def margin(self, x, y=None):
            return self.score(x) / self.threshold

        def payload(self):
            return {"threshold": self.threshold.clone()}

        @classmethod
        def from_payload(cls, payload):
            return cls(float(payload["threshold"]))

    clf = Classifier("lenet", 10, 1, 28).eval()
    det = MixDefense(clf, [Brightness(0.5)])
    back = load_detector(save_bundle(det, tmp_path / "bundle.pt"))
    x = torch.cat([torch.zeros(2, 1, 28, 28), torch.ones(2, 1, 28, 28)])
    assert back.layer_names == ["test_brightness"]
    assert back.detect(x).rejected.tolist() == [False, False, True, True]
    Brightness(0.25).save(tmp_path / "layer.pt")
    assert float(Brightness.load(tmp_path / "layer.pt").threshold) == 0.25


def test_registering_twice_under_one_name_is_refused():
    from mixdefense.layers import SAEC, register_layer

    class Other(SAEC):
        type_name = "saec"

    with pytest.raises(ValueError, match="already registered"):
        register_layer(Other)

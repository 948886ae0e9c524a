"""The composite detector: layer order, SAEC rejections skip the classifier, verdicts, bundles."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mixdefense
from mixdefense.classifiers import Classifier
from mixdefense.layers.contranet import ContraNet
from mixdefense.layers.saec import SAEC
from mixdefense.nets import EmbeddingNet, Reconstructor
from mixdefense.pipeline import MixDefense, load_detector, save_bundle


class CountingClassifier(Classifier):
    """A LeNet that records how many images it was shown."""

    seen = 0

    def forward(self, x):
        type(self).seen += x.shape[0]
        return super().forward(x)


def _saec(threshold: float) -> SAEC:
    saec = SAEC()
    saec.threshold.fill_(threshold)
    return saec


def _contranet(threshold: float) -> ContraNet:
    det = ContraNet(Reconstructor(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)), EmbeddingNet(1, 6, "cnn", (4, 8)))
    det.thresholds.fill_(threshold)
    return det


def _images(n: int = 12) -> torch.Tensor:
    x = torch.rand(n, 1, 28, 28) * 0.2 + 0.4  # smooth-ish content
    x[: n // 2] = (x[: n // 2] + 0.3 * torch.rand(n // 2, 1, 28, 28)).clamp(0, 1)  # noisy half
    return x


def test_an_saec_rejection_skips_the_classifier_and_later_layers():
    x = _images()
    saec = _saec(0.0)
    scores = saec.score(x)
    saec.threshold.fill_(float(scores.median()))  # rejects the half with the lower score
    clf = CountingClassifier("lenet", 10, 1, 28)
    CountingClassifier.seen = 0
    verdict = MixDefense(clf, [saec, _contranet(1e9)]).detect(x)
    pre_rejected = scores < scores.median()
    assert torch.equal(verdict.rejected_by("saec"), pre_rejected)
    assert CountingClassifier.seen == int((~pre_rejected).sum())  # the classifier never saw SAEC's rejections
    assert (verdict.labels[pre_rejected] == -1).all() and (verdict.labels[~pre_rejected] >= 0).all()
    assert not verdict.rejected_by("contranet").any()
    assert verdict.caught_by() == {"saec": int(pre_rejected.sum()), "contranet": 0, "accepted": int((~pre_rejected).sum())}


def test_post_layer_sees_the_predicted_label():
    x = _images()
    clf = Classifier("lenet", 10, 1, 28).eval()
    seen = {}

    class Spy(nn.Module):
        kind, name = "post", "spy"

        def forward(self, xs, ys):
            seen["y"] = ys.clone()
            return torch.zeros(len(ys), dtype=torch.bool)

    verdict = MixDefense(clf, [Spy()]).detect(x)
    assert torch.equal(seen["y"], clf(x).argmax(1)) and torch.equal(verdict.labels, seen["y"])
    assert not verdict.rejected.any() and (verdict.layer == -1).all()


def test_layer_order_and_names_are_checked():
    clf = Classifier("lenet", 10, 1, 28)
    with pytest.raises(ValueError, match="before post"):
        MixDefense(clf, [_contranet(1.0), _saec(0.0)])
    with pytest.raises(ValueError, match="unique"):
        MixDefense(clf, [_saec(0.0), _saec(0.0)])
    with pytest.raises(ValueError, match="kind"):
        MixDefense(clf, [nn.Identity()])


def test_bundle_round_trip_gives_identical_verdicts(tmp_path):
    x = _images()
    saec = _saec(0.0)
    saec.threshold.fill_(float(saec.score(x).quantile(0.25)))
    contranet = _contranet(0.0)
    clf = Classifier("lenet", 10, 1, 28).eval()
    contranet.thresholds.fill_(float(contranet.score(x, clf(x).argmax(1)).median()))
    detector = MixDefense(clf, [saec, contranet])
    save_bundle(detector, tmp_path / "d.pt", dataset="synthetic")
    payload = torch.load(tmp_path / "d.pt", weights_only=True)  # plain weights only
    assert payload["format"] == "mixdefense.detector/1"
    loaded = mixdefense.load_detector(tmp_path / "d.pt")
    a, b = detector.detect(x), loaded.detect(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.layer, b.layer) and a.layer_names == b.layer_names
    assert a.rejected.any() and not a.rejected.all()
    assert loaded.record == {"dataset": "synthetic"}


def test_detect_validates_its_input():
    detector = MixDefense(Classifier("lenet", 10, 1, 28), [_saec(0.0)])
    with pytest.raises(ValueError, match="size"):
        detector.detect(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        detector.detect(torch.full((2, 1, 28, 28), float("nan")))


def test_layer_table_gives_the_same_verdict_as_detect():
    x = _images(16)
    saec = _saec(0.0)
    saec.threshold.fill_(float(saec.score(x).quantile(0.3)))
    contranet = _contranet(0.0)
    clf = Classifier("lenet", 10, 1, 28).eval()
    contranet.thresholds.fill_(float(contranet.score(x, clf(x).argmax(1)).quantile(0.6)))
    detector = MixDefense(clf, [saec, contranet])
    labels, margins = detector.layer_table(x)
    assert margins.shape == (2, 16)
    assert torch.equal(margins[0] > 1, saec(x)) and torch.equal(margins[1] > 1, contranet(x, labels))
    a, b = detector.detect(x), detector.verdict_from_table(labels, margins)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.layer, b.layer) and torch.equal(a.rejected, b.rejected)
    assert a.rejected_by("saec").any() and a.rejected_by("contranet").any()


# -- mixdefense detect ---------------------------------------------------------------------
@pytest.fixture()
def bundle_path(tmp_path):
    x = _images()
    saec = _saec(0.0)
    saec.threshold.fill_(float(saec.score(x).quantile(0.25)))
    clf = Classifier("lenet", 10, 1, 28).eval()
    contranet = _contranet(0.0)
    contranet.thresholds.fill_(float(contranet.score(x, clf(x).argmax(1)).median()))
    path = tmp_path / "d.pt"
    save_bundle(MixDefense(clf, [saec, contranet]), path)
    return path


def test_detect_cli_on_pngs_folders_and_tensors(bundle_path, tmp_path, capsys):
    import json

    from PIL import Image

    from mixdefense.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    x = _images(4)
    for i in range(3):
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    Image.new("RGB", (40, 30), (120, 10, 200)).save(tmp_path / "colour.jpg")  # converted to gray, resized
    torch.save(x[:2], tmp_path / "batch.pt")
    assert main(["detect", "--bundle", str(bundle_path), str(folder), str(tmp_path / "colour.jpg"),
                 str(tmp_path / "batch.pt"), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 3 + 1 + 2
    assert all((r["layer"] is None) == (not r["rejected"]) for r in records)
    assert all(r["label"] is None or 0 <= r["label"] < 10 for r in records)
    assert main(["detect", "--bundle", str(bundle_path), str(folder)]) == 0
    assert "3 image(s)" in capsys.readouterr().out


def test_detect_cli_speed_settings(bundle_path, tmp_path, capsys):
    """``--speed channels_last`` gives float32's verdicts; an unknown variant is refused with a reason."""
    import json

    from mixdefense.cli import main

    torch.save(_images(12), tmp_path / "batch.pt")
    assert main(["detect", "--bundle", str(bundle_path), str(tmp_path / "batch.pt"), "--json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(["detect", "--bundle", str(bundle_path), str(tmp_path / "batch.pt"), "--json",
                 "--speed", "channels_last"]) == 0
    assert json.loads(capsys.readouterr().out) == fp32
    assert main(["detect", "--bundle", str(bundle_path), str(tmp_path / "batch.pt"), "--speed", "fp16"]) == 2
    assert "--speed" in capsys.readouterr().err


def test_accelerate_bf16_layers_leaves_the_classifier_float32(bundle_path):
    from mixdefense.speed import accelerate, layer_networks

    x = _images(12)
    reference = load_detector(bundle_path).eval()
    detector = accelerate(load_detector(bundle_path).eval(), "bf16_layers+channels_last")
    layer_nets = [n for layer in detector.layers for n in layer_networks(layer)]
    assert len(layer_nets) == 2  # ContraNet's reconstructor and metric net; SAEC owns none
    assert all("forward" in vars(n) for n in layer_nets)  # wrapped in bf16 autocast
    assert "forward" not in vars(detector.classifier)
    with torch.no_grad():
        assert torch.allclose(detector.classifier(x), reference.classifier(x), atol=1e-5)
        y = torch.zeros(12, dtype=torch.long)
        got, want = detector.layers[1].score(x, y), reference.layers[1].score(x, y)
        assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0.1, atol=0.05)  # bf16 rounding only
    with pytest.raises(ValueError):
        accelerate(reference, "bf16+bf16_layers")


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "not a readable image"),
    (lambda p: torch.save(torch.rand(2, 3, 28, 28), p), "channel"),
    (lambda p: torch.save(torch.rand(2, 1, 28, 28) * 2, p), "[0, 1]"),
    (lambda p: torch.save({"x": 1}, p), "expected a tensor"),
    (lambda p: torch.save(torch.rand(2, 1, 32, 32), p), "size 28x28"),
])
def test_detect_cli_refuses_bad_inputs_with_a_reason(bundle_path, tmp_path, capsys, make, reason):
    from mixdefense.cli import main

    bad = tmp_path / ("bad.png" if "image" in reason else "bad.pt")
    make(bad)
    assert main(["detect", "--bundle", str(bundle_path), str(bad)]) == 2
    assert reason in capsys.readouterr().err


def test_detect_cli_missing_inputs_and_bundles(bundle_path, tmp_path, capsys):
    from mixdefense.cli import main

    assert main(["detect", "--bundle", str(bundle_path), str(tmp_path / "nope.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["detect", "--bundle", str(bundle_path), str(tmp_path / "notes.txt")]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    assert main(["detect", "--bundle", str(tmp_path / "none.pt"), str(tmp_path / "notes.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_layers_of_another_dataset_are_refused():
    with pytest.raises(ValueError, match="different datasets"):
        MixDefense(Classifier("lenet", 43, 1, 28), [_contranet(1.0)])  # a 10-class ContraNet
    rgb = ContraNet(Reconstructor(3, 16, 10, 4, (4, 8), (8, 8, 8, 4)), EmbeddingNet(3, 6, "cnn", (4, 8)))
    with pytest.raises(ValueError, match="channel"):
        MixDefense(Classifier("lenet", 10, 1, 28), [rgb])


def test_bundle_records_versions(bundle_path):
    detector = mixdefense.load_detector(bundle_path)
    assert detector.versions["torch"] == torch.__version__ and detector.versions["mixdefense"] == mixdefense.__version__

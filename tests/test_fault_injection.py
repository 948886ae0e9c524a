"""Fault injection (issue #10): every public boundary refuses bad input with one clear error.

A table of malformed image batches (wrong rank, channel count, size; integer, bool or complex
dtype; values outside [0, 1]; NaN, ±Inf; empty batches and images; non-tensors) is run
against every boundary that takes images: SAEC (score, forward, margin, calibrate),
ContraNet (score, forward, margin, calibrate, detect), the composite ``MixDefense`` (detect,
layer_table; a tiny one and the shipped MNIST bundle) and the ``mixdefense detect`` CLI (the
same batches saved as ``.pt`` files: exit code 2).  Each case must raise a ``ValueError``
whose message names what was expected -- never a crash deep inside a convolution, never a
silent clamp.  Labels, datamodule arguments, corrupt dataset splits, ``load_images`` and
malicious or corrupt files (bundles, parts, checkpoints) get their own tables below.
``test_the_table_is_large`` states how many cases ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mixdefense.classifiers import Classifier, load_classifier, save_classifier
from mixdefense.cli import check_ckpt_path, load_images, main
from mixdefense.layers.contranet import ContraNet
from mixdefense.layers.saec import SAEC
from mixdefense.nets import (
    EmbeddingNet,
    Reconstructor,
    load_cgan,
    load_metric,
    save_cgan,
)
from mixdefense.pipeline import MixDefense, load_detector, save_bundle

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")
BUNDLE = REPO / "artifacts/mnist/detector.pt"

# -- the bad image batches ---------------------------------------------------------------
# (id, make(channels, side) -> bad input, regex the message must match).  Every regex names
# what was expected.  Cases that depend on the boundary's geometry take (channels, side).
Maker = Callable[[int, int], object]


def _with(value: float, c: int, s: int, where: str = "one") -> torch.Tensor:
    x = torch.rand(2, c, s, s)
    if where == "all":
        return x.fill_(value)
    x[1, 0, s // 2, s // 2] = value  # one bad pixel among valid ones
    return x


BAD_IMAGES: list[tuple[str, Maker, str]] = [
    ("rank2", lambda c, s: torch.rand(s, s), "expected a 4-D tensor"),
    ("rank3", lambda c, s: torch.rand(c, s, s), "expected a 4-D tensor"),
    ("rank5", lambda c, s: torch.rand(1, 2, c, s, s), "expected a 4-D tensor"),
    ("scalar", lambda c, s: torch.tensor(0.5), "expected a 4-D tensor"),
    ("channels_2", lambda c, s: torch.rand(2, 2, s, s), r"expected .*channel"),
    ("channels_4", lambda c, s: torch.rand(2, 4, s, s), r"expected .*channel"),
    ("channels_last_layout", lambda c, s: torch.rand(2, s, s, c), r"expected .*channel|expected images"),
    ("uint8", lambda c, s: (torch.rand(2, c, s, s) * 255).to(torch.uint8), "expected a floating-point tensor"),
    ("int64", lambda c, s: torch.randint(0, 2, (2, c, s, s)), "expected a floating-point tensor"),
    ("bool", lambda c, s: torch.rand(2, c, s, s) > 0.5, "expected a floating-point tensor"),
    ("complex", lambda c, s: torch.rand(2, c, s, s).to(torch.complex64), "expected a floating-point tensor"),
    ("above_one", lambda c, s: torch.rand(2, c, s, s) + 1.0, r"values must lie in \[0, 1\]"),
    ("pixel_scale_255", lambda c, s: torch.rand(2, c, s, s) * 255, r"values must lie in \[0, 1\]"),
    ("negative", lambda c, s: torch.rand(2, c, s, s) - 0.5, r"values must lie in \[0, 1\]"),
    ("one_pixel_1.0001", lambda c, s: _with(1.0001, c, s), r"values must lie in \[0, 1\]"),
    ("nan_all", lambda c, s: _with(float("nan"), c, s, "all"), r"NaN or Inf.*expected finite"),
    ("nan_one_pixel", lambda c, s: _with(float("nan"), c, s), r"NaN or Inf.*expected finite"),
    ("+inf", lambda c, s: _with(float("inf"), c, s), r"NaN or Inf.*expected finite"),
    ("-inf", lambda c, s: _with(float("-inf"), c, s), r"NaN or Inf.*expected finite"),
    ("empty_batch", lambda c, s: torch.rand(0, c, s, s), "empty batch.*expected at least one image"),
    ("empty_images", lambda c, s: torch.rand(2, c, 0, 0), r"empty images.*expected"),
    ("list", lambda c, s: torch.rand(2, c, s, s).tolist(), "expected a torch.Tensor"),
    ("numpy", lambda c, s: np.random.rand(2, c, s, s).astype(np.float32), "expected a torch.Tensor"),
    ("none", lambda c, s: None, "expected a torch.Tensor"),
    ("string", lambda c, s: "image.png", "expected a torch.Tensor"),
]

# wrong geometry, per kind of boundary: (id, make, regex)
WRONG_SIZE_FIXED = [  # the classifier's size is fixed (28 × 28 here)
    ("size_32", lambda c, s: torch.rand(2, c, s + 4, s + 4), r"expected images of size 28x28"),
    ("non_square", lambda c, s: torch.rand(2, c, s, s - 8), r"expected images of size 28x28"),
    ("tiny_3x3", lambda c, s: torch.rand(2, c, 3, 3), r"expected images of size 28x28"),
]
WRONG_SIZE_SAEC = [  # any size at least the 5 × 5 high-pass kernel
    ("tiny_3x3", lambda c, s: torch.rand(2, c, 3, 3), r"expected images of at least 5x5"),
    ("tiny_1x1", lambda c, s: torch.rand(2, c, 1, 1), r"expected images of at least 5x5"),
    ("thin_40x4", lambda c, s: torch.rand(2, c, 40, 4), r"expected images of at least 5x5"),
]
WRONG_SIZE_CONTRANET = [  # square, at least 8 × 8 (resized to the cGAN's side)
    ("non_square", lambda c, s: torch.rand(2, c, s, s + 2), r"expected square images"),
    ("tiny_4x4", lambda c, s: torch.rand(2, c, 4, 4), r"expected images of at least 8x8"),
    ("tiny_1x1", lambda c, s: torch.rand(2, c, 1, 1), r"expected images of at least 8x8"),
]
RGB_FOR_GRAY = [("rgb_for_gray", lambda c, s: torch.rand(2, 3, s, s), r"expected 1 channel")]


# -- tiny detectors (the way tests/test_pipeline.py builds them) -----------------------------
def _saec() -> SAEC:
    saec = SAEC()
    saec.threshold.fill_(1e-3)
    return saec


def _contranet() -> ContraNet:
    det = ContraNet(Reconstructor(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)).eval(), EmbeddingNet(1, 6, "cnn", (4, 8)).eval())
    det.thresholds.fill_(1.0)
    return det


def _classifier() -> Classifier:
    return Classifier("lenet", 10, 1, 28).eval()


def _labels_for(x: object) -> torch.Tensor:
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 2
    return torch.zeros(n, dtype=torch.long)


@pytest.fixture(scope="module")
def shipped() -> MixDefense:
    if not BUNDLE.exists():
        pytest.skip(f"{BUNDLE} not present")
    return load_detector(BUNDLE)


# boundary id -> (call(x, fixtures), channels, side, geometry cases)
BOUNDARIES: dict[str, tuple[Callable, int, int, list]] = {
    "SAEC.score": (lambda x, f: _saec().score(x), 3, 32, WRONG_SIZE_SAEC),
    "SAEC.forward": (lambda x, f: _saec()(x), 1, 28, WRONG_SIZE_SAEC),
    "SAEC.margin": (lambda x, f: _saec().margin(x), 3, 32, WRONG_SIZE_SAEC),
    "SAEC.calibrate": (lambda x, f: SAEC().calibrate(x), 1, 28, WRONG_SIZE_SAEC),
    "ContraNet.score": (lambda x, f: _contranet().score(x, _labels_for(x)), 1, 16, WRONG_SIZE_CONTRANET + RGB_FOR_GRAY),
    "ContraNet.forward": (lambda x, f: _contranet()(x, _labels_for(x)), 1, 16, WRONG_SIZE_CONTRANET + RGB_FOR_GRAY),
    "ContraNet.margin": (lambda x, f: _contranet().margin(x, _labels_for(x)), 1, 28, WRONG_SIZE_CONTRANET + RGB_FOR_GRAY),
    "ContraNet.calibrate": (lambda x, f: _contranet().calibrate(x, _labels_for(x)), 1, 16,
                            WRONG_SIZE_CONTRANET + RGB_FOR_GRAY),
    "ContraNet.detect": (lambda x, f: _contranet().detect(x, _classifier()), 1, 28, WRONG_SIZE_CONTRANET + RGB_FOR_GRAY),
    "MixDefense.detect": (lambda x, f: MixDefense(_classifier(), [_saec(), _contranet()]).detect(x), 1, 28,
                          WRONG_SIZE_FIXED + RGB_FOR_GRAY),
    "MixDefense.layer_table": (lambda x, f: MixDefense(_classifier(), [_saec(), _contranet()]).layer_table(x), 1, 28,
                               WRONG_SIZE_FIXED + RGB_FOR_GRAY),
    "shipped_bundle.detect": (lambda x, f: f["shipped"].detect(x), 1, 28, WRONG_SIZE_FIXED + RGB_FOR_GRAY),
}

IMAGE_CASES = [
    pytest.param(b, cid, make, regex, id=f"{b}-{cid}")
    for b, (_, _, _, geometry) in BOUNDARIES.items()
    for cid, make, regex in BAD_IMAGES + geometry
]


@pytest.mark.parametrize("boundary,case,make,regex", IMAGE_CASES)
def test_bad_images_are_rejected_at_every_boundary(boundary, case, make, regex, request):
    call, c, s, _ = BOUNDARIES[boundary]
    fixtures = {"shipped": request.getfixturevalue("shipped")} if boundary.startswith("shipped") else {}
    torch.manual_seed(0)
    x = make(c, s)
    with pytest.raises(ValueError, match=regex):
        call(x, fixtures)


def test_valid_images_pass_every_boundary(shipped):
    """The table's baseline: the valid shape of every boundary is accepted (so the rejections are
    caused by the injected fault, not by the fixture)."""
    for boundary, (call, c, s, _) in BOUNDARIES.items():
        x = torch.rand(4, c, s, s) * 0.5 + 0.25
        if boundary == "SAEC.calibrate":
            x = torch.rand(64, c, s, s) * 0.2  # noise must score lower than these smooth-ish images
            x[:, :, 4:-4, 4:-4] = 0.6
        call(x, {"shipped": shipped})


def test_float64_and_float16_inputs_are_cast_not_refused():
    """A float tensor in [0, 1] of another precision is valid input: cast to the model's dtype
    (values unchanged up to rounding), never a dtype crash inside a convolution."""
    x = torch.rand(3, 1, 28, 28)
    det = MixDefense(_classifier(), [_saec(), _contranet()])
    ref = det.layer_table(x)
    for dtype in (torch.float64, torch.float16):
        labels, margins = det.layer_table(x.to(dtype))
        assert torch.equal(labels, ref[0]) and margins.dtype == torch.float32
        assert det.detect(x.to(dtype)).labels.shape == (3,)
        assert _contranet().score(x.to(dtype), labels).dtype == torch.float32


# -- labels --------------------------------------------------------------------------------
BAD_LABELS = [
    ("float", lambda b: torch.zeros(b), "expected an integer tensor"),
    ("bool", lambda b: torch.zeros(b, dtype=torch.bool), "expected an integer tensor"),
    ("too_large", lambda b: torch.full((b,), 10), r"labels must lie in \[0, 10\)"),
    ("negative", lambda b: torch.full((b,), -1), r"labels must lie in \[0, 10\)"),
    ("too_short", lambda b: torch.zeros(b - 1, dtype=torch.long), r"expected shape \[2\]"),
    ("two_d", lambda b: torch.zeros(b, 1, dtype=torch.long), r"expected shape \[2\]"),
    ("list", lambda b: [0] * b, "expected a torch.Tensor of labels"),
]
LABEL_BOUNDARIES = {
    "ContraNet.score": lambda x, y: _contranet().score(x, y),
    "ContraNet.forward": lambda x, y: _contranet()(x, y),
    "ContraNet.calibrate": lambda x, y: _contranet().calibrate(x, y),
}
LABEL_CASES = [pytest.param(b, make, regex, id=f"{b}-{cid}") for b in LABEL_BOUNDARIES for cid, make, regex in BAD_LABELS]


@pytest.mark.parametrize("boundary,make,regex", LABEL_CASES)
def test_bad_labels_are_rejected(boundary, make, regex):
    with pytest.raises(ValueError, match=regex):
        LABEL_BOUNDARIES[boundary](torch.rand(2, 1, 16, 16), make(2))


# -- the detect CLI: the same bad batches as .pt files, plus bad files ------------------------
NON_TENSOR_FILE = r"expected a tensor \[N, C, H, W\], found|not a plain-weights file"
CLI_CASES = [pytest.param(cid, make, NON_TENSOR_FILE if cid in ("list", "numpy", "none", "string") else regex, id=cid)
             for cid, make, regex in BAD_IMAGES + WRONG_SIZE_FIXED + RGB_FOR_GRAY
             if cid not in ("rank3",)]  # a [C, H, W] file is one image by design (it gains a batch axis)
BAD_FILES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing", lambda p: None, "no such file or folder"),
    ("corrupt_png", lambda p: p.with_suffix(".png").write_bytes(b"\x89PNG not really"), "not a readable image"),
    ("text_as_pt", lambda p: p.write_text("hello"), "not a plain-weights file"),
    ("truncated_pt", lambda p: p.write_bytes(_saved_bytes(torch.rand(2, 1, 28, 28))[:200]), "not a plain-weights file"),
    ("unknown_extension", lambda p: p.with_suffix(".gif").write_bytes(b"GIF89a"), "unsupported file type"),
    ("dict_in_pt", lambda p: torch.save({"x": torch.rand(2, 1, 28, 28)}, p), "expected a tensor"),
    ("empty_folder", lambda p: p.with_suffix("").mkdir(), "folder holds no"),
]


def _saved_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _detect(args: list[str], capsys) -> tuple[int, str]:
    code = main(["detect", "--bundle", str(BUNDLE), *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,make,regex", CLI_CASES)
def test_detect_cli_refuses_bad_tensor_files(case, make, regex, tmp_path, capsys, shipped):
    import re

    path = tmp_path / f"{case}.pt"
    torch.manual_seed(0)
    torch.save(make(1, 28), path)
    code, err = _detect([str(path)], capsys)
    assert code == 2, err
    assert err.startswith("mixdefense detect: ") and str(path) in err and re.search(regex, err), err


@pytest.mark.parametrize("case,make,regex", [pytest.param(*c, id=c[0]) for c in BAD_FILES])
def test_detect_cli_refuses_bad_files(case, make, regex, tmp_path, capsys, shipped):
    path = tmp_path / "input.pt"
    make(path)
    target = {"corrupt_png": path.with_suffix(".png"), "unknown_extension": path.with_suffix(".gif"),
              "empty_folder": path.with_suffix("")}.get(case, path)
    code, err = _detect([str(target)], capsys)
    assert code == 2 and regex in err, err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_detect_cli_refuses_a_bad_batch_size(value, tmp_path, capsys, shipped):
    torch.save(torch.rand(2, 1, 28, 28), tmp_path / "ok.pt")
    code, err = _detect(["--batch-size", value, str(tmp_path / "ok.pt")], capsys)
    assert code == 2 and "--batch-size must be >= 1" in err


# -- datamodules and load_images ----------------------------------------------------------------
BAD_DATAMODULE_ARGS = [
    ({"val_fraction": 1.5}, "val_fraction"), ({"val_fraction": -0.1}, "val_fraction"),
    ({"batch_size": 0}, "batch_size"), ({"num_workers": -1}, "num_workers"), ({"translate": -2}, "translate"),
    ({"train_subset": 0}, "train_subset"), ({"test_subset": -5}, "test_subset"), ({"image_size": 4}, "image_size"),
]


@pytest.mark.parametrize("kwargs,key", BAD_DATAMODULE_ARGS, ids=[str(k) for k, _ in BAD_DATAMODULE_ARGS])
def test_datamodule_arguments_are_checked(kwargs, key):
    from datamodules import MNISTDataModule

    with pytest.raises(ValueError, match=key):
        MNISTDataModule(**kwargs)


def _fake_datamodule(images, labels):
    from datamodules.base import ImageDataModule

    class Fake(ImageDataModule):
        name, num_classes, in_channels, default_image_size = "fake", 10, 1, 8

        def expected_files(self):
            return []

        def load_split(self, train):
            return images, labels

    return Fake(val_fraction=0.0)


GOOD = (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
CORRUPT_SPLITS = [
    ("float_images", (torch.rand(4, 1, 8, 8), GOOD[1]), "expected images uint8"),
    ("wrong_channels", (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), GOOD[1]), r"expected images uint8 \[N, 1, 8, 8\]"),
    ("wrong_size", (torch.zeros(4, 1, 9, 9, dtype=torch.uint8), GOOD[1]), r"expected images uint8 \[N, 1, 8, 8\]"),
    ("rank3", (torch.zeros(4, 8, 8, dtype=torch.uint8), GOOD[1]), "expected images uint8"),
    ("no_images", (torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)), "no images"),
    ("label_out_of_range", (GOOD[0], torch.tensor([0, 1, 2, 10])), r"labels must lie in \[0, 10\)"),
    ("float_labels", (GOOD[0], torch.zeros(4)), "expected integer labels"),
    ("label_count", (GOOD[0], torch.zeros(3, dtype=torch.long)), r"expected integer labels \[4\]"),
]


@pytest.mark.parametrize("case,split,regex", [pytest.param(*c, id=c[0]) for c in CORRUPT_SPLITS])
def test_a_corrupt_dataset_split_is_refused_at_setup(case, split, regex):
    for stage in ("fit", "test"):
        with pytest.raises(ValueError, match=regex):
            _fake_datamodule(*split).setup(stage)


def test_a_valid_fake_split_sets_up():
    dm = _fake_datamodule(*GOOD)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and len(y) == 4


@pytest.mark.parametrize("kwargs,regex", [
    ({"dataset": "svhn", "split": "test"}, "unknown dataset"),
    ({"dataset": "mnist", "split": "calibration"}, "split must be"),
    ({"dataset": "mnist", "split": "test", "n": 0}, "n must be"),
    ({"dataset": "mnist", "split": "test", "n": -3}, "n must be"),
], ids=["dataset", "split", "n=0", "n<0"])
def test_load_images_refuses_bad_arguments(kwargs, regex):
    with pytest.raises(ValueError, match=regex):
        load_images(**kwargs)


# -- loading: pickles that carry code, corrupt and foreign files --------------------------------
class Payload:
    """Unpickling this runs ``open(marker, 'w')``: the marker file proves code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


LOADERS: dict[str, Callable[[Path], object]] = {
    "load_detector": load_detector,
    "load_classifier": load_classifier,
    "SAEC.load": SAEC.load,
    "ContraNet.load": ContraNet.load,
    "load_cgan": load_cgan,
    "load_metric": load_metric,
    "ckpt_path": lambda p: check_ckpt_path(["fit", "--ckpt_path", str(p)]),
}


def _evil_files(tmp_path: Path) -> dict[str, Callable[[Path], None]]:
    marker = tmp_path / "PWNED"
    return {
        "bare_pickle": lambda p: torch.save(Payload(marker), p),
        "tagged_bundle": lambda p: torch.save({"format": "mixdefense.detector/1", "classifier": Payload(marker)}, p),
        "in_state_dict": lambda p: torch.save({"format": "mixdefense.classifier/1", "config": {},
                                               "state_dict": {"w": Payload(marker)}}, p),
        "lightning_ckpt": lambda p: torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, p),
    }


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("kind", ["bare_pickle", "tagged_bundle", "in_state_dict", "lightning_ckpt"])
def test_a_pickle_carrying_code_is_refused_and_never_runs(loader, kind, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    _evil_files(tmp_path)[kind](path)
    with pytest.raises((ValueError, SystemExit)) as info:
        LOADERS[loader](path)
    message = str(info.value) if info.type is ValueError else capsys.readouterr().err
    if info.type is SystemExit:
        assert info.value.code == 2
    assert f"refusing to load {path}: not a plain-weights file" in message
    assert "weights_only=True" in message and "GLOBAL" in message  # names the code it would have run
    assert not (tmp_path / "PWNED").exists()


def test_the_detect_cli_refuses_an_evil_bundle(tmp_path, capsys):
    _evil_files(tmp_path)["tagged_bundle"](tmp_path / "evil.pt")
    torch.save(torch.rand(1, 1, 28, 28), tmp_path / "x.pt")
    assert main(["detect", "--bundle", str(tmp_path / "evil.pt"), str(tmp_path / "x.pt")]) == 2
    assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("loader", [k for k in LOADERS if k != "ckpt_path"])
def test_missing_corrupt_and_foreign_files_are_refused(loader, tmp_path):
    load = LOADERS[loader]
    with pytest.raises(FileNotFoundError, match="file not found"):
        load(tmp_path / "nowhere.pt")
    (tmp_path / "text.pt").write_text("not torch")
    with pytest.raises(ValueError, match="not a plain-weights file"):
        load(tmp_path / "text.pt")
    torch.save({"format": "someone.else/1", "state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a MixDefense .* file .*missing format tag"):
        load(tmp_path / "foreign.pt")


def _tiny_bundle(path: Path) -> MixDefense:
    det = MixDefense(_classifier(), [_saec(), _contranet()])
    save_bundle(det, path, dataset="synthetic")
    return det


def test_a_malformed_bundle_is_one_clear_error(tmp_path):
    _tiny_bundle(tmp_path / "d.pt")
    payload = torch.load(tmp_path / "d.pt", weights_only=True)
    broken = {k: v for k, v in payload.items() if k != "layers"}
    torch.save(broken, tmp_path / "no_layers.pt")
    with pytest.raises(ValueError, match="(?s)malformed detector bundle file.*layers"):
        load_detector(tmp_path / "no_layers.pt")
    payload["classifier"]["state_dict"] = {k: v[..., :1] for k, v in payload["classifier"]["state_dict"].items()}
    torch.save(payload, tmp_path / "bad_weights.pt")
    with pytest.raises(ValueError, match="(?s)malformed detector bundle file.*size mismatch"):
        load_detector(tmp_path / "bad_weights.pt")


def test_a_bundle_records_versions_and_config(tmp_path):
    import mixdefense

    _tiny_bundle(tmp_path / "d.pt")
    loaded = load_detector(tmp_path / "d.pt")
    assert loaded.versions == {"mixdefense": str(mixdefense.__version__), "torch": str(torch.__version__)}
    assert loaded.record == {"dataset": "synthetic"}
    assert loaded.classifier.config["image_size"] == 28 and loaded.classifier.config["num_classes"] == 10


def test_parts_of_different_datasets_are_reported_not_guessed(tmp_path):
    """A classifier and a ContraNet that disagree on the class count or channel count are refused
    when the pipeline is built (and so when a bundle of them is loaded)."""
    gtsrb_like = Classifier("lenet", 43, 1, 28)
    with pytest.raises(ValueError, match="43 classes|knows 10 classes.*43"):
        MixDefense(gtsrb_like, [_saec(), _contranet()])
    rgb = Classifier("lenet", 10, 3, 28)
    with pytest.raises(ValueError, match="1-channel images, the classifier 3"):
        MixDefense(rgb, [_saec(), _contranet()])
    # the same mismatch inside a file: a bundle whose classifier was swapped for another dataset's
    _tiny_bundle(tmp_path / "d.pt")
    payload = torch.load(tmp_path / "d.pt", weights_only=True)
    save_classifier(gtsrb_like, tmp_path / "c.pt")
    clf = torch.load(tmp_path / "c.pt", weights_only=True)
    payload["classifier"] = {"config": clf["config"], "state_dict": clf["state_dict"]}
    torch.save(payload, tmp_path / "swapped.pt")
    with pytest.raises(ValueError, match="different datasets"):
        load_detector(tmp_path / "swapped.pt")


def test_shipped_bundle_says_which_size_it_expects(shipped):
    with pytest.raises(ValueError, match="expected images of size 28x28, got 32x32"):
        shipped.detect(torch.rand(2, 1, 32, 32))


def test_a_part_saved_for_another_format_is_refused(tmp_path):
    save_cgan(Reconstructor(1, 16, 10, 4, (4, 8), (8, 8, 8, 4)), tmp_path / "cgan.pt")
    with pytest.raises(ValueError, match="not a MixDefense detector bundle"):
        load_detector(tmp_path / "cgan.pt")
    _saec().save(tmp_path / "saec.pt")
    with pytest.raises(ValueError, match="not a MixDefense ContraNet"):
        ContraNet.load(tmp_path / "saec.pt")
    _contranet().save(tmp_path / "contranet.pt")
    with pytest.raises(ValueError, match="not a MixDefense classifier"):
        load_classifier(tmp_path / "contranet.pt")


# -- the size of the table ---------------------------------------------------------------------
def test_the_table_is_large():
    counts = {
        "bad image batches x image boundaries": len(IMAGE_CASES),
        "bad labels x label boundaries": len(LABEL_CASES),
        "bad .pt batches through `mixdefense detect`": len(CLI_CASES),
        "bad files through `mixdefense detect`": len(BAD_FILES) + 2,
        "datamodule arguments / corrupt splits / load_images": len(BAD_DATAMODULE_ARGS) + len(CORRUPT_SPLITS) + 4,
        "evil pickles x loaders": 4 * len(LOADERS) + 1,
    }
    total = sum(counts.values())
    print(f"\nfault-injection cases: {total} ({len(BOUNDARIES)} image boundaries)")
    for what, n in counts.items():
        print(f"  {n:4d}  {what}")
    assert len(BOUNDARIES) >= 12 and len(IMAGE_CASES) >= 12 * len(BAD_IMAGES)
    assert total >= 400

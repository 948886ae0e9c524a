"""Target classifiers: [0, 1] input, logits out, normalisation inside, safe save/load."""

from __future__ import annotations

import pickle

import pytest
import torch

from mixdefense.classifiers import (
    ARCHITECTURES,
    NORMALIZATION,
    Classifier,
    load_classifier,
    save_classifier,
)

CASES = [
    ("lenet", 10, 1, 28, {}),
    ("lenet", 10, 1, 32, {}),
    ("resnet_small", 43, 3, 32, {"blocks": [1, 1, 1], "widths": [8, 16, 32]}),
    ("densenet169", 10, 3, 32, {}),
    ("resnet34", 43, 3, 32, {}),
    ("vgg", 10, 3, 32, {}),
    ("vgg", 10, 1, 28, {"cfg": [8, "M", 16, "M"], "dropout": 0.1}),
]


@pytest.mark.parametrize("arch,classes,channels,size,kwargs", CASES)
def test_logits_shape_on_unit_range_input(arch, classes, channels, size, kwargs):
    model = Classifier(arch, classes, channels, size, arch_kwargs=kwargs).eval()
    x = torch.rand(2, channels, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, classes) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_all_architectures_are_covered():
    assert {c[0] for c in CASES} == set(ARCHITECTURES)


def test_vgg_is_torchvisions_conv_stack_with_a_global_pool_head():
    model = Classifier("vgg", 10, 3, 32, dataset="cifar10")
    convs = [m for m in model.backbone.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.features) == 6
    assert model.backbone.head[-1].in_features == 128
    assert 0.25e6 < sum(p.numel() for p in model.parameters()) < 0.35e6   # about ResNet-20's size


def test_normalisation_is_inside_the_model():
    model = Classifier("lenet", dataset="mnist")
    mean, std = NORMALIZATION["mnist"]
    x = torch.full((1, 1, 28, 28), mean[0])
    assert torch.allclose(model.normalize(x), torch.zeros_like(x), atol=1e-6)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(model.normalize(x), (x - mean[0]) / std[0])


def test_check_input_rejects_what_the_model_cannot_take():
    model = Classifier("lenet", image_size=28)
    model.check_input(torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match="channel"):
        model.check_input(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="28x28"):
        model.check_input(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.check_input(torch.rand(1, 1, 28, 28) * 255)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown classifier arch"):
        Classifier("vgg16")
    with pytest.raises(ValueError, match="vgg cfg"):
        Classifier("vgg", 10, 3, 32, arch_kwargs={"cfg": ["M", 0]})
    with pytest.raises(ValueError, match="in_channels"):
        Classifier("lenet", in_channels=2)
    with pytest.raises(ValueError, match="mean/std"):
        Classifier("lenet", in_channels=1, mean=[0.1, 0.2, 0.3], std=[1, 1, 1])


@pytest.mark.parametrize("arch,kwargs", [("resnet_small", {"blocks": [1, 1, 1], "widths": [8, 16, 32]}),
                                         ("vgg", {"cfg": [8, 8, "M", 16, "M"]})])
def test_save_load_round_trip_is_weights_only(tmp_path, arch, kwargs):
    model = Classifier(arch, 10, 3, 32, dataset="cifar10", arch_kwargs=kwargs).eval()
    path = save_classifier(model, tmp_path / "c.pt", note="test")
    payload = torch.load(path, weights_only=True)  # must not need pickled code
    assert payload["metadata"]["note"] == "test"
    loaded = load_classifier(path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "mixdefense.classifier/1", "payload": _Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load"):
        load_classifier(path)


def test_load_refuses_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a MixDefense classifier"):
        load_classifier(path)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pt")

"""``benchmarks/throughput.py``'s helpers on synthetic tensors and a tiny module (fast; no artifacts, no data).

The script is loaded from its file (it is not part of the package): ``benchmark_scripts.load_benchmark``.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from benchmark_scripts import load_benchmark

tp = load_benchmark("throughput")


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_agreement_one_of_four_differs():
    ref = (torch.tensor([0, 1, 2, -1]), torch.tensor([False, False, True, True]))
    label_differs = (torch.tensor([0, 1, 1, -1]), torch.tensor([False, False, True, True]))
    decision_differs = (torch.tensor([0, 1, 2, -1]), torch.tensor([True, False, True, True]))
    for other in (label_differs, decision_differs):
        a = tp.agreement(ref, other)
        assert a == pytest.approx(0.75)
        assert tp.usable(a) is False
    assert tp.agreement(ref, ref) == 1.0 and tp.usable(1.0) is True


def test_usable_threshold():
    assert tp.usable(0.999) and not tp.usable(0.9989) and not tp.usable(None)
    n = 2000  # 2 of 2000 verdicts differ: 99.9 %, still usable; 3 differ: not
    labels, rej = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    two = labels.clone()
    two[:2] = 1
    three = labels.clone()
    three[:3] = 1
    assert tp.usable(tp.agreement((labels, rej), (two, rej)))
    assert not tp.usable(tp.agreement((labels, rej), (three, rej)))


def test_agreement_refuses_mismatched_sizes():
    with pytest.raises(ValueError):
        tp.agreement((torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool)),
                     (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool)))


def test_time_is_positive(one_thread):
    net = _tiny()
    x = torch.rand(4, 1, 8, 8)
    calls = []

    @torch.no_grad()
    def fn():
        calls.append(1)
        return net(x)

    seconds = tp._time(fn, repeats=2)
    assert seconds > 0 and seconds != float("inf")
    assert len(calls) == 3  # one warm-up, then the repeats


def test_parse_variant_and_tile():
    assert tp.parse_variant("fp32") == ()
    assert tp.parse_variant("channels_last+bf16") == ("channels_last", "bf16")
    assert tp.parse_variant("compile+bf16_layers+channels_last") == ("channels_last", "bf16_layers", "compile")
    for bad in ("fp16", "bf16+bf16", "", "fp32+bf16", "bf16+bf16_layers"):
        with pytest.raises(ValueError):
            tp.parse_variant(bad)
    x = torch.arange(3).float().view(3, 1, 1, 1)
    assert tp.tile(x, 7).flatten().tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert tp.tile(x, 2).flatten().tolist() == [0, 1]


def test_variants_keep_a_tiny_classifiers_verdicts(one_thread):
    """bf16 autocast and channels-last on a tiny module: float32 outputs, and decide_batched / agreement work end to end."""
    torch.manual_seed(0)
    x = torch.rand(10, 1, 8, 8)
    ref_net = _tiny()

    def decider(net):
        def decide(xb):
            labels = net(xb).argmax(1)
            return labels, torch.zeros_like(labels, dtype=torch.bool)
        return decide

    with torch.no_grad():
        ref = tp.decide_batched(decider(ref_net), x, batch=4)
        assert ref[0].shape == (10,) and ref[1].dtype == torch.bool
        for transforms in (("channels_last",), ("bf16",)):
            net = _tiny()
            net.load_state_dict(ref_net.state_dict())
            prepare = tp.apply_variant([net], transforms)
            assert net(prepare(x)).dtype == torch.float32
            got = tp.decide_batched(decider(net), prepare(x), batch=4)
            a = tp.agreement(ref, got)
            assert 0.0 <= a <= 1.0
        assert tp.agreement(ref, tp.decide_batched(decider(ref_net), x, batch=3)) == 1.0


def test_layer_networks_and_best_usable():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.stats = nn.Linear(2, 2), nn.Identity()

    layer = Layer()
    assert tp.layer_networks(layer) == [layer.net]  # Identity has no parameters: not a network
    rows = {"fp32": {"usable": True, "images_per_s": 10.0}, "bf16": {"usable": False, "images_per_s": 30.0},
            "channels_last": {"usable": True, "images_per_s": 12.0}, "compile": {"usable": False, "error": "x"}}
    assert tp.best_usable(rows) == "channels_last"
    s = tp.summarise({"classifier": {"variants": rows},
                      "mixdefense": {"variants": {"fp32": {"usable": True, "images_per_s": 2.0},
                                                  "bf16": {"usable": True, "images_per_s": 3.0}}},
                      "magnet": {"status": "not shipped"}})
    assert s["mixdefense"]["best_usable_variant"] == "bf16"
    assert s["mixdefense"]["best_ratio"] == pytest.approx(3.0 / 12.0)
    assert s["mixdefense"]["fp32_ratio"] == pytest.approx(0.2)
    assert s["magnet"] == {"status": "not shipped"}


def test_bf16_layers_autocasts_the_layer_networks_only(one_thread):
    """``bf16_layers``: the detector layers' networks compute in bf16 (their outputs cast back to float32), the
    classifier stays float32; ``bf16`` autocasts both; a layer net outside ``nets`` is refused."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    ref_clf, ref_layer = _tiny(), _tiny()
    with torch.no_grad():
        want_clf, want_layer = ref_clf(x), ref_layer(x)
    for transforms, clf_exact, layer_exact in ((("bf16_layers",), True, False), (("bf16",), False, False),
                                               (("channels_last",), True, True)):
        clf, layer = _tiny(), _tiny()
        clf.load_state_dict(ref_clf.state_dict())
        layer.load_state_dict(ref_layer.state_dict())
        prepare = tp.apply_variant([clf, layer], transforms, layer_nets=[layer])
        with torch.no_grad():
            got_clf, got_layer = clf(prepare(x)), layer(prepare(x))
        assert got_clf.dtype == got_layer.dtype == torch.float32
        assert torch.allclose(got_clf, want_clf, atol=1e-6) is clf_exact, transforms
        assert torch.allclose(got_layer, want_layer, atol=1e-6) is layer_exact, transforms
        assert torch.allclose(got_layer, want_layer, atol=5e-2)  # bf16 rounds; it does not compute something else
    with pytest.raises(ValueError):
        tp.apply_variant([_tiny()], ("bf16_layers",), layer_nets=[_tiny()])

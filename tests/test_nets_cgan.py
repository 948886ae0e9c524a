"""cGAN parts: shapes and ranges per dataset size, CBN conditioning, projection D."""

from __future__ import annotations

import pytest
import torch

from mixdefense.nets import (
    ConditionalBatchNorm2d,
    Encoder,
    Generator,
    ProjectionDiscriminator,
    Reconstructor,
    load_cgan,
    save_cgan,
)

SIZES = [("mnist", 1, 32, 10), ("cifar10", 3, 32, 10), ("gtsrb", 3, 32, 43)]


@pytest.mark.parametrize("name,c,s,k", SIZES)
def test_shapes_and_ranges(name, c, s, k):
    enc = Encoder(c, s, channels=(8, 16, 32), latent_dim=12)
    gen = Generator(c, s, latent_dim=12, num_classes=k, channels=(32, 32, 16, 8))
    dis = ProjectionDiscriminator(c, k, channels=(16, 16, 16, 16))
    x = torch.rand(4, c, s, s)
    y = torch.randint(0, k, (4,))
    z, mu, logvar = enc.sample(x)
    assert z.shape == mu.shape == logvar.shape == (4, 12)
    out = gen(z, y)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    d = dis(out, y)
    assert d.shape == (4,) and torch.isfinite(d).all()


def test_cbn_really_conditions():
    torch.manual_seed(0)
    gen = Generator(3, 32, latent_dim=8, num_classes=10, channels=(16, 16, 8, 8)).eval()
    with torch.no_grad():  # give the classes different γ/β, as training would
        for m in gen.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.gamma.weight.normal_(1.0, 0.3)
                m.beta.weight.normal_(0.0, 0.3)
        z = torch.randn(2, 8)
        a = gen(z, torch.tensor([0, 0]))
        b = gen(z, torch.tensor([1, 1]))
    assert (a - b).abs().mean() > 1e-3  # same z, different y → different image


def test_cbn_starts_as_plain_batch_norm():
    cbn = ConditionalBatchNorm2d(4, 3)
    x = torch.randn(8, 4, 5, 5)
    y = torch.randint(0, 3, (8,))
    assert torch.allclose(cbn(x, y), torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)


def test_projection_term_depends_on_the_label():
    torch.manual_seed(0)
    dis = ProjectionDiscriminator(3, 5, channels=(8, 8, 8, 8)).eval()  # eval: no power iteration between calls
    x = torch.rand(1, 3, 32, 32)
    h = dis.features(x)
    outs = torch.stack([dis(x, torch.tensor([k])) for k in range(5)]).squeeze(1)
    expected = dis.psi(h).squeeze() + (dis.embed.weight @ h[0])
    assert torch.allclose(outs, expected, atol=1e-5)
    assert outs.std() > 0


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        Encoder(3, 30)
    with pytest.raises(ValueError, match="multiple of 8"):
        Generator(3, 28)
    with pytest.raises(ValueError, match="4 widths"):
        Generator(3, 32, channels=(8, 8))


def test_aux_class_critic_is_optional():
    dis = ProjectionDiscriminator(3, 7, channels=(8, 8, 8, 8), aux_classifier=True).eval()
    x, y = torch.rand(5, 3, 32, 32), torch.randint(0, 7, (5,))
    score, logits = dis.score_and_classify(x, y)
    assert score.shape == (5,) and logits.shape == (5, 7)
    assert torch.allclose(score, dis(x, y), atol=1e-6)
    assert torch.allclose(logits, dis.classifier(x), atol=1e-5)
    assert ProjectionDiscriminator(3, 7, channels=(8, 8, 8, 8)).score_and_classify(x, y)[1] is None


def test_reconstructor_round_trips_through_a_plain_weights_file(tmp_path):
    model = Reconstructor(1, 32, num_classes=10, latent_dim=6, enc_channels=(4, 8, 8), gen_channels=(8, 8, 8, 4)).eval()
    x, y = torch.rand(3, 1, 32, 32), torch.tensor([0, 4, 9])
    save_cgan(model, tmp_path / "cgan.pt", epochs=2)
    loaded = load_cgan(tmp_path / "cgan.pt")
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x, y), model(x, y))
        assert torch.equal(model(x, y), model.generator(model.encoder(x)[0], y))  # deterministic: the mean μ
    raw = torch.load(tmp_path / "cgan.pt", weights_only=True)
    assert raw["epochs"] == 2


def test_load_cgan_refuses_other_files(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a MixDefense cGAN"):
        load_cgan(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_cgan(tmp_path / "missing.pt")


class _ReadsItsLabel(torch.nn.Module):
    """A fake 'generator' that writes the label into pixel (0, 0), and a classifier that reads it back."""

    def __init__(self, obey: bool):
        super().__init__()
        self.obey = obey

    def forward(self, z, y):
        out = torch.zeros(z.shape[0], 1, 8, 8)
        out[:, 0, 0, 0] = (y if self.obey else torch.zeros_like(y)).float() / 10
        return out


class _PixelClassifier(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 10).float()


class _Identity(torch.nn.Module):
    def forward(self, x):
        return torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2)


def test_binding_counts_every_wrong_label_once():
    from mixdefense.evaluation.reconstruction import evaluate_reconstructions

    x, y = torch.zeros(20, 1, 8, 8), torch.arange(20) % 10
    obeys = evaluate_reconstructions(_Identity(), _ReadsItsLabel(True), _PixelClassifier(), x, y, 10, batch_size=7,
                                     progress=False)
    assert obeys.binding == 1.0 and obeys.true_label_accuracy == 1.0
    ignores = evaluate_reconstructions(_Identity(), _ReadsItsLabel(False), _PixelClassifier(), x, y, 10, progress=False)
    # always draws "0": a wrong label y' is hit only when y' = 0, i.e. for the 18 images whose true label is not 0
    assert ignores.binding == pytest.approx(18 / (20 * 9))
    assert ignores.binding_per_label[0] == 1.0 and ignores.binding_per_label[3] == 0.0
    with pytest.raises(ValueError, match="labels"):
        evaluate_reconstructions(_Identity(), _ReadsItsLabel(True), _PixelClassifier(), x, y[:3], 10)

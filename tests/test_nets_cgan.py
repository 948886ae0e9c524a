"""cGAN parts: shapes and ranges per dataset size, CBN conditioning, projection D."""

from __future__ import annotations

import pytest
import torch

from mixdefense.nets import ConditionalBatchNorm2d, Encoder, Generator, ProjectionDiscriminator

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

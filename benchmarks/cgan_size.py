"""Parameter and FLOP counts of the cGAN parts, next to the paper's Table 1 (CIFAR-10).

    python benchmarks/cgan_size.py [--enc 112 224 448] [--latent 128] [--gen 384 320 224 128] [--dis 128 128 128 128]
    python benchmarks/cgan_size.py --config experiments/gtsrb/cgan.yaml     # the sizes a config trains

The defaults are the CIFAR-10 paper profile, sized to match Table 1.  The discriminator
count excludes the class critic (training only, like D itself).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one 32×32 RGB image
(a multiply-add counts as 2 FLOPs, as in Table 1's convention of GFLOPs).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from mixdefense.nets import Encoder, Generator, ProjectionDiscriminator

TABLE1 = {"encoder": (3.81e6, 0.11e9), "generator": (4.3e6, 1.69e9)}


def count(module: torch.nn.Module, *inputs) -> tuple[int, int]:
    module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return sum(p.numel() for p in module.parameters()), counter.get_total_flops()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--enc", type=int, nargs=3, default=[112, 224, 448])
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--gen", type=int, nargs=4, default=[384, 320, 224, 128])
    ap.add_argument("--dis", type=int, nargs=4, default=[128, 128, 128, 128])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--config", help="take the sizes from a cGAN config's model.init_args instead")
    args = ap.parse_args(argv)
    if args.config:
        from omegaconf import OmegaConf

        m = OmegaConf.load(args.config).model.init_args
        args.enc, args.latent, args.gen, args.dis = list(m.enc_channels), m.latent_dim, list(m.gen_channels), list(m.dis_channels)
        args.classes, args.channels = m.num_classes, m.in_channels
    c = args.channels
    x, y = torch.rand(1, c, 32, 32), torch.zeros(1, dtype=torch.long)
    z = torch.randn(1, args.latent)
    rows = {
        "encoder": count(Encoder(c, 32, args.enc, args.latent), x),
        "generator": count(Generator(c, 32, args.latent, args.classes, args.gen), z, y),
        "discriminator": count(ProjectionDiscriminator(c, args.classes, args.dis), x, y),
    }
    out = {}
    for name, (params, flops) in rows.items():
        ref = TABLE1.get(name)
        out[name] = {"params_M": params / 1e6, "GFLOPs": flops / 1e9,
                     "table1_params_M": ref[0] / 1e6 if ref else None, "table1_GFLOPs": ref[1] / 1e9 if ref else None}
        tail = f"   (Table 1: {ref[0] / 1e6:.2f} M, {ref[1] / 1e9:.2f} GFLOPs)" if ref else "   (training only)"
        print(f"{name:<14} {params / 1e6:6.2f} M params  {flops / 1e9:6.3f} GFLOPs{tail}")
    print(json.dumps({"settings": vars(args), "counts": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

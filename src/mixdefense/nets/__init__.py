"""Network building blocks of ContraNet (plain PyTorch): the revised cGAN's parts."""

from mixdefense.nets.cgan import (
    ConditionalBatchNorm2d,
    Encoder,
    Generator,
    ProjectionDiscriminator,
    Reconstructor,
    load_cgan,
    save_cgan,
)

__all__ = ["ConditionalBatchNorm2d", "Encoder", "Generator", "ProjectionDiscriminator", "Reconstructor", "load_cgan",
           "save_cgan"]

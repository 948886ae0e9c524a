"""Network building blocks of ContraNet (plain PyTorch): the revised cGAN's parts."""

from mixdefense.nets.cgan import ConditionalBatchNorm2d, Encoder, Generator, ProjectionDiscriminator

__all__ = ["ConditionalBatchNorm2d", "Encoder", "Generator", "ProjectionDiscriminator"]

"""Network building blocks of ContraNet (plain PyTorch): the revised cGAN's parts and the embedding net M."""

from mixdefense.nets.cgan import (
    ConditionalBatchNorm2d,
    Encoder,
    Generator,
    ProjectionDiscriminator,
    Reconstructor,
    load_cgan,
    save_cgan,
)
from mixdefense.nets.metric import EmbeddingNet, load_metric, save_metric

__all__ = ["ConditionalBatchNorm2d", "EmbeddingNet", "Encoder", "Generator", "ProjectionDiscriminator", "Reconstructor",
           "load_cgan", "load_metric", "save_cgan", "save_metric"]

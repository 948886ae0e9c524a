"""How good a trained cGAN is for ContraNet: faithful reconstructions and label binding.

Two numbers decide whether the revised cGAN can serve the SP layer (paper §4):

* **faithfulness** — ``SSIM(x, G(μ(x), y))`` with the true label ``y``: a clean image must be
  reconstructed closely (torchmetrics SSIM, data range 1, one value per image);
* **label binding** — for every wrong label ``y′ ≠ y``, the share of reconstructions
  ``G(μ(x), y′)`` that an independent classifier labels ``y′``.  If G ignored the label, an
  AE's wrong predicted label would still give a faithful reconstruction and go unnoticed.

Reconstructions use the encoder mean ``μ(x)`` (deterministic).  Images are ``[N, C, S, S]``
floats in ``[0, 1]``; the classifier takes its own input size (the reconstructions are
resized to it when needed, e.g. 32×32 MNIST reconstructions for a 28×28 LeNet).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchmetrics.functional.image import structural_similarity_index_measure as ssim
from tqdm.auto import tqdm


@dataclass
class ReconstructionReport:
    """Faithfulness and label binding of a cGAN on ``num_images`` labelled images."""

    num_images: int
    ssim_mean: float
    ssim_median: float
    mse_mean: float
    binding: float  # share of (image, wrong label) pairs classified as the wrong label
    binding_per_label: list[float] = field(default_factory=list)  # indexed by the wrong label
    true_label_accuracy: float = float("nan")  # classifier accuracy on the true-label reconstructions

    def as_dict(self) -> dict:
        return asdict(self)


def resize_for(classifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` resized (bilinear, antialiased) to ``classifier.image_size`` when it has one and differs."""
    side = getattr(classifier, "image_size", None)
    if side is None or x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


@torch.no_grad()
def evaluate_reconstructions(encoder: nn.Module, generator: nn.Module, classifier: nn.Module, x: torch.Tensor,
                             y: torch.Tensor, num_classes: int, batch_size: int = 250,
                             progress: bool = True) -> ReconstructionReport:
    """Faithfulness (SSIM/MSE with the true label) and binding over **all** wrong labels.

    Args:
        encoder: ``x → (μ, log σ²)``.
        generator: ``(z, y) → image`` in [0, 1].
        classifier: ``image → logits`` (the dataset's target classifier).
        x: ``[N, C, S, S]`` in [0, 1]; ``y``: ``[N]`` int64 true labels.
        num_classes: ``K``; each image is reconstructed under its ``K − 1`` wrong labels.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need as many labels as images (>0), got {x.shape[0]} images and {y.shape[0]} labels")
    encoder, generator, classifier = encoder.eval(), generator.eval(), classifier.eval()
    ssims, mses, hits, totals, true_ok = [], [], torch.zeros(num_classes), torch.zeros(num_classes), 0
    for xb, yb in tqdm(list(zip(x.split(batch_size), y.split(batch_size))), desc="reconstructions", disable=not progress):
        mu = encoder(xb)[0]
        rec = generator(mu, yb)
        ssims.append(ssim(rec, xb, data_range=1.0, reduction="none"))
        mses.append((rec - xb).pow(2).flatten(1).mean(1))
        true_ok += int((classifier(resize_for(classifier, rec)).argmax(1) == yb).sum())
        for shift in range(1, num_classes):
            yw = (yb + shift) % num_classes
            pred = classifier(resize_for(classifier, generator(mu, yw))).argmax(1)
            hits.index_add_(0, yw, (pred == yw).float())
            totals.index_add_(0, yw, torch.ones_like(yw, dtype=torch.float))
    s = torch.cat(ssims)
    return ReconstructionReport(
        num_images=int(x.shape[0]), ssim_mean=float(s.mean()), ssim_median=float(s.median()),
        mse_mean=float(torch.cat(mses).mean()), binding=float(hits.sum() / totals.sum()),
        binding_per_label=[float(h / t) if t > 0 else float("nan") for h, t in zip(hits, totals)],
        true_label_accuracy=true_ok / x.shape[0],
    )


@torch.no_grad()
def figure8_grid(reconstruct: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, other: int = 6) -> torch.Tensor:
    """A grid like paper Figure 8: one row per image — input, ``reconstruct(x, y)``, then ``other`` wrong labels.

    ``reconstruct(x, y) → [B, C, S, S]`` (e.g. a :class:`~mixdefense.nets.Reconstructor`); the
    wrong labels are ``y + 1, …, y + other`` (mod ``num_classes``).  Returns ``[C, H, W]`` in [0, 1]
    (``torchvision.utils.save_image`` writes it).
    """
    was_training = reconstruct.training
    reconstruct.eval()
    cols = [x, reconstruct(x, y)]
    for j in range(1, min(other, num_classes - 1) + 1):
        cols.append(reconstruct(x, (y + j) % num_classes))
    reconstruct.train(was_training)
    tiles = torch.stack(cols, dim=1).flatten(0, 1)  # [N·cols, C, H, W]
    return torchvision.utils.make_grid(tiles, nrow=len(cols), padding=1, pad_value=1.0)

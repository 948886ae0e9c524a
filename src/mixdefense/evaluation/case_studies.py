"""The paper's §6 case studies on ContraNet's cGAN (Figures 12 and 13).

(a) Targeted FGSM (and PGD) on the cGAN's *input*, so that ``G(μ(x_adv), t) ≈ x_adv`` for a wrong label ``t``
(budgets :data:`CASE_EPS`, L∞ in [0, 1] pixel units); (b) FGSM (and PGD) on the latent ``z = μ(x)``, so that
``G(z + δ, t) ≈ x`` (budgets :data:`LATENT_EPS`, L∞ in latent units).  Each reports, per attack and budget,
ContraNet's acceptance rate, the rate at which the reconstruction is classified as ``t`` and the mean
``x``–reconstruction distance, and writes a grid of the first images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mixdefense.attacks import perturbation_norm
from mixdefense.attacks.adaptive import attack_latent, fgsm_on_cgan_input, reconstruction_distance
from mixdefense.evaluation.plots import case_study_grid
from mixdefense.evaluation.reconstruction import resize_for

CASE_EPS = [0.01, 0.03, 0.05, 0.1]  # §6 (a), paper: 0.01–0.1
LATENT_EPS = [0.05, 0.1, 0.2, 0.3]  # §6 (b), paper: 0.05–0.3


def contranet_layer(detector):
    """The detector's ContraNet layer (its post layer with a ``reconstructor``); ``ValueError`` if it has none."""
    layer = next((lay for lay in detector.layers if lay.kind == "post" and hasattr(lay, "reconstructor")), None)
    if layer is None:
        raise ValueError("the detector has no ContraNet layer")
    return layer


@torch.no_grad()
def _accepts(cn, x32: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """ContraNet's verdict on ``(x, reconstruction)`` pairs: ``True`` where every score is below its threshold."""
    from mixdefense.layers.contranet import image_scores

    parts = image_scores(x32, rec, cn.scores, cn.metric, cn.distance)
    return ~cn.decide(parts)


@torch.no_grad()
def _binding(classifier, rec: torch.Tensor, t: torch.Tensor) -> float:
    """The fraction in [0, 1] of reconstructions ``rec [B, C, S, S]`` the classifier labels ``t [B]``."""
    return (classifier(resize_for(classifier, rec)).argmax(1) == t).float().mean().item()


def case_studies(detector, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, out: Path, dataset: str, grid_rows: int = 6,
                 pgd_steps: int = 20) -> dict:
    """§6 (a) FGSM on the cGAN input and (b) FGSM / PGD on ``z``; numbers on all of ``x``, grids on the first rows.

    ``x [B, C, H, W]`` in [0, 1] (resized to the cGAN's side), ``y [B]`` the true and ``t [B]`` the target labels;
    each attack runs once as FGSM (one step) and once with ``pgd_steps`` steps.  Writes ``out/figure12.png`` and
    ``out/figure13.png`` (``grid_rows`` images each); returns the numbers (rates in [0, 1]).
    """
    cn = contranet_layer(detector)
    rec, clf = cn.reconstructor, detector.classifier
    side = rec.image_size
    x32 = x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", antialias=True,
                                                       align_corners=False).clamp(0, 1)
    with torch.no_grad():
        base = rec(x32, t)
    result = {"images": len(t), "clean_under_t": {
        "contranet_accepts": _accepts(cn, x32, base).float().mean().item(),
        "reconstruction_classified_as_t": _binding(clf, base, t),
        "dist_x_rec": reconstruction_distance(x32, base).mean().item()}}
    # (a) Figure 12
    cols_a = [("x (true y)", x32[:grid_rows]), ("G(μ(x), t)", base[:grid_rows])]
    rows_a = []
    for steps in (1, pgd_steps):
        for eps in CASE_EPS:
            x_adv = fgsm_on_cgan_input(rec, x32, t, eps, steps=steps)
            with torch.no_grad():
                r = rec(x_adv, t)
            rows_a.append({"attack": "fgsm" if steps == 1 else f"pgd{steps}", "eps": eps,
                           "linf": perturbation_norm(x_adv, x32, "linf").max().item(),
                           "contranet_accepts": _accepts(cn, x_adv, r).float().mean().item(),
                           "reconstruction_classified_as_t": _binding(clf, r, t),
                           "dist_x_rec": reconstruction_distance(x_adv, r).mean().item()})
            if steps == 1 or eps == CASE_EPS[-1]:
                name = "FGSM" if steps == 1 else f"PGD-{steps}"
                cols_a += [(f"AE {name} ε={eps:g}", x_adv[:grid_rows]), ("G(μ(AE), t)", r[:grid_rows])]
    labels = [f"y={int(a)} → t={int(b)}" for a, b in zip(y[:grid_rows], t[:grid_rows])]
    case_study_grid(cols_a, out / "figure12.png", row_labels=labels,
                    title=f"§6 (a) on {dataset}: targeted FGSM on the cGAN input so that G(μ(x_adv), t) ≈ x_adv")
    # (b) Figure 13
    with torch.no_grad():
        z0 = rec.encoder(x32)[0]
    cols_b = [("x (true y)", x32[:grid_rows]), ("G(μ(x), t)", base[:grid_rows])]
    rows_b = []
    for steps in (1, pgd_steps):
        for eps in LATENT_EPS:
            z = attack_latent(rec.generator, z0, t, x32, eps, steps=steps)
            with torch.no_grad():
                g = rec.generator(z, t)
            rows_b.append({"attack": "fgsm" if steps == 1 else f"pgd{steps}", "eps": eps,
                           "z_linf": (z - z0).abs().amax().item(),
                           "contranet_accepts": _accepts(cn, x32, g).float().mean().item(),
                           "reconstruction_classified_as_t": _binding(clf, g, t),
                           "dist_x_rec": reconstruction_distance(x32, g).mean().item()})
            if steps == 1 or eps == LATENT_EPS[-1]:
                name = "FGSM" if steps == 1 else f"PGD-{steps}"
                cols_b.append((f"G(z+δ, t) {name} ε={eps:g}", g[:grid_rows]))
    case_study_grid(cols_b, out / "figure13.png", row_labels=labels,
                    title=f"§6 (b) on {dataset}: attack on the latent z so that G(z+δ, t) ≈ x (label t fixed)")
    result["fgsm_on_cgan_input"] = rows_a
    result["attack_on_z"] = rows_b
    return result

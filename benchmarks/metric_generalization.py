"""How far ContraNet's metric model M carries from its training images to new ones.

    python benchmarks/metric_generalization.py --dataset gtsrb [--n 1500]
        [--metric artifacts/gtsrb/metric.pt [more.pt ...]] [--latent-noise 0 0.25 0.5 1]

On ``n`` random images of M's training split (the datamodule's default seeded split) and ``n``
random test images, with the shipped cGAN (``artifacts/<ds>/cgan.pt``) and classifier:

* the cGAN's faithfulness there: mean SSIM(x, G(μ(x), y)), and on the training images also with
  the latent ``z = μ + τ·σ·ε`` for each ``--latent-noise`` τ (what ``reference_latent_noise``
  gives M to train on); and its binding on the hardest wrong label: the share of
  ``G(μ(x), y_top)`` that the classifier labels ``y_top``, the wrong class it scores highest for
  ``x`` (what tells whether those reconstructions carry their class at all);
* for each M: the positive distances ``d(M(x), M(G(μ(x), y)))`` (mean, 95 % quantile: where a
  5 % threshold sits), the distances with the classifier's top wrong label, the AUROC of
  telling them apart, with that label and with one random wrong label, and the share of rare
  classes (fewer than ``--rare`` training images) among the positives above the 95 % quantile
  against their share of the images.

A gap between the training and the test columns is what M learned of its training images
rather than of the classes.  No attack is run.  Writes
``benchmarks/results/metric_generalization_<ds>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from datamodules import DATAMODULES
from mixdefense.classifiers import load_classifier
from mixdefense.metrics import detection_auroc
from mixdefense.nets.cgan import load_cgan
from mixdefense.nets.metric import DISTANCES, embedding_distance, load_metric
from mixdefense.triplets import sample_confusable_labels, sample_wrong_labels


@torch.no_grad()
def split_figures(cgan, classifier, metrics: dict, x: torch.Tensor, y: torch.Tensor, rare: torch.Tensor, taus=(),
                  distance: str = "l2", batch: int = 500) -> dict:
    """Faithfulness and per-M distance figures on ``x [N, C, S, S]`` in ``[0, 1]`` with labels ``y``;
    ``rare [num_classes]`` marks the rare classes (bool)."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.cat([cgan.encoder(xb)[0] for xb in x.split(batch)])
    logits = torch.cat([classifier(xb) for xb in x.split(batch)])
    y_top = sample_confusable_labels(logits, y, 1, 1, 1)[:, 0]
    y_rand = sample_wrong_labels(y, cgan.num_classes, 1, gen)[:, 0]
    recon = lambda z, labels: torch.cat([cgan.generator(zb, lb) for zb, lb in zip(z.split(batch), labels.split(batch))])
    pos, top, rand = recon(mu, y), recon(mu, y_top), recon(mu, y_rand)
    classify = lambda imgs: torch.cat([classifier(b) for b in imgs.split(batch)]).argmax(1)
    out = {"ssim": float(ssim(pos, x, data_range=1.0)), "binding_top_wrong": float((classify(top) == y_top).double().mean()),
           "rare_share": float(rare[y].double().mean())}
    for tau in taus:
        z = torch.cat([cgan.encoder.sample(xb, gen, scale=tau)[0] for xb in x.split(batch)])
        out[f"ssim_latent_noise_{tau:g}"] = float(ssim(recon(z, y), x, data_range=1.0))
    for name, net in metrics.items():
        embed = lambda imgs: torch.cat([net(b) for b in imgs.split(batch)])
        e_x = embed(x)
        d_pos, d_top, d_rand = (embedding_distance(e_x, embed(r), distance) for r in (pos, top, rand))
        out[name] = {"d_pos_mean": float(d_pos.mean()), "d_pos_q95": float(d_pos.quantile(0.95)),
                     "d_top_mean": float(d_top.mean()), "auroc_top_wrong": detection_auroc(d_pos, d_top),
                     "auroc_random_wrong": detection_auroc(d_pos, d_rand),
                     "rare_share_of_tail": float(rare[y][d_pos > d_pos.quantile(0.95)].double().mean())}
    return out


def markdown(result: dict) -> str:
    train, test = result["train"], result["test"]
    lines = [f"# Metric model M on {result['dataset']}: training images vs test images ({result['n']} each)", "",
             f"cGAN SSIM(x, G(μ(x), y)): train {train['ssim']:.3f}, test {test['ssim']:.3f}; "
             f"G(μ(x), y_top) labelled y_top by the classifier: train {train['binding_top_wrong']:.3f}, "
             f"test {test['binding_top_wrong']:.3f}"]
    for key in sorted(k for k in train if k.startswith("ssim_latent_noise_")):
        lines.append(f"- train, latent z = μ + {key.rsplit('_', 1)[1]}·σ·ε: {train[key]:.3f}")
    lines += ["", f"Rare classes: fewer than {result['rare']} training images; their share of the images: train "
              f"{train['rare_share']:.3f}, test {test['rare_share']:.3f}", "",
              "| M | split | d_pos mean | d_pos 95 % | d_top-wrong mean | AUROC top wrong | AUROC random wrong "
              "| rare share above d_pos 95 % |", "|---|---|---|---|---|---|---|---|"]
    for name in result["metrics"]:
        for split in ("train", "test"):
            f = result[split][name]
            lines.append(f"| {name} | {split} | {f['d_pos_mean']:.3f} | {f['d_pos_q95']:.3f} | {f['d_top_mean']:.3f} | "
                         f"{f['auroc_top_wrong']:.4f} | {f['auroc_random_wrong']:.4f} | {f['rare_share_of_tail']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATAMODULES), required=True)
    ap.add_argument("--n", type=int, default=1500, help="images per split")
    ap.add_argument("--metric", nargs="+", default=None, help="metric models (default artifacts/<ds>/metric.pt)")
    ap.add_argument("--latent-noise", type=float, nargs="*", default=[0.25, 0.5, 1.0], help="τ values for the SSIM sweep")
    ap.add_argument("--rare", type=int, default=400, help="classes with fewer training images count as rare")
    ap.add_argument("--distance", choices=DISTANCES, default="l2", help="M's embedding distance, as trained")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    paths = args.metric or [f"artifacts/{args.dataset}/metric.pt"]
    metrics = {str(p): load_metric(p).eval() for p in paths}
    cgan = load_cgan(f"artifacts/{args.dataset}/cgan.pt").eval()
    classifier = load_classifier(f"artifacts/{args.dataset}/classifier.pt").eval()
    dm = DATAMODULES[args.dataset](data_root=args.data_root, image_size=cgan.image_size)
    dm.setup("fit"), dm.setup("test")
    result = {"dataset": args.dataset, "n": args.n, "rare": args.rare, "metrics": list(metrics)}
    rare = torch.bincount(dm.data_train.labels, minlength=cgan.num_classes) < args.rare
    for split, data in (("train", dm.data_train), ("test", dm.data_test)):
        pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(1))[: args.n]
        x, y = data.images[pick].float() / 255, data.labels[pick]
        result[split] = split_figures(cgan, classifier, metrics, x, y, rare,
                                      args.latent_noise if split == "train" else (), args.distance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"metric_generalization_{args.dataset}.json").write_text(json.dumps(result, indent=2))
    (out / f"metric_generalization_{args.dataset}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

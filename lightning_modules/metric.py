"""Training of ContraNet's deep metric model M (paper §4.2, eq. 6) on top of a frozen cGAN.

Per batch of clean ``(x, y)``: the frozen reconstructor gives ``R(x, y)`` and ``R(x, y′)`` for
``negatives_per_image`` distinct wrong labels ``y′`` (:mod:`mixdefense.triplets`); anchors
``M(x)``, references ``M(R(·))``; a PML ``TripletMarginMiner`` + ``TripletMarginLoss``.
``triplets`` chooses which triplets eq. 6 sees (:class:`mixdefense.triplets.TripletObjective`):

* ``"batch"`` (default; MixDefense+): every label-valid triplet of the batch — an anchor's
  positives are all reconstructions drawn with its label, mostly other images' (wrong-label
  ones included), its negatives all reconstructions drawn with another label;
* ``"paper"`` (the paper's §4.2; ``experiments/<ds>/metric_paper_variant.yaml``): per image —
  anchor ``M(x)``, positive ``M(R(x, y))`` of the same image, negatives ``M(R(x, y′))`` of the
  same image with its wrong labels ``y′``; the miner (``semihard`` there, as in the authors'
  code: ``d(a, p) < d(a, n) ≤ d(a, p) + margin``) picks among those only.  Adversarial anchors
  are their own images here too (positive ``R(x_adv, y)``, negative ``R(x_adv, y_adv)``).
With ``confusable_negatives = k > 0`` and a ``classifier``, ``k`` of each image's wrong labels are
drawn among the ``confusable_top_k`` wrong labels the classifier scores highest for the clean
image (:func:`mixdefense.triplets.sample_confusable_labels`): hard negatives in label space,
the classes that differ from the image's in details, which uniform labels on many classes
rarely pick; the validation then also logs ``val/auroc_confusable`` (the classifier's top wrong
label as the negative).  ``anchor_noise`` adds uniform noise ``U(−a, a)``, ``a ~ U(0, anchor_noise)``, to the anchors
(a clean image with a little noise is still clean: it keeps M from keying on pixel-exact
detail that any perturbation would change).  With ``adversarial_anchors = k > 0`` (and the
classifier), the first ``k`` images of each batch are also turned into L∞ PGD AEs against the
classifier, ``ε ~ U(adversarial_eps)`` per batch (:func:`mixdefense.triplets.adversarial_anchors`):
extra anchors of their true label with the references ``R(x_adv, y)`` and ``R(x_adv, y_adv)``;
with ``adversarial_val_eps`` set (and the classifier) the validation also logs
``val/auroc_adversarial``, clean positives vs the scores of successful PGD AEs at that budget
with their predicted label (what ContraNet sees under attack).

With ``reference_bank`` the references come from a :class:`mixdefense.triplets.ReferenceBank`
built once at the start of training (the frozen cGAN's float32 outputs for each training image's
true label, its ``confusable_top_k`` confusable labels and ``bank_uniform_negatives`` fixed
uniform wrong labels; the negatives are re-drawn among them every step): a step then costs
only M (GTSRB, 2-core CPU, the 32/64/128 CNN in bfloat16: 7.6 instead of 2.0 batches/s).  It
needs the training set unaugmented and indexed (datamodule ``augment: false``,
``train_indices: true``); the bank's build counts in the trainer's ``max_time``.  Under ``precision: bf16-mixed`` M runs in bfloat16 while the triplet
objective and the distances stay float32 (the exported M is float32 either way).

Logged: ``train/loss``, ``train/active`` (share of the batch's candidate triplets — label-valid,
or per image with ``triplets: paper`` — whose margin is violated), ``train/mined``; validation: the distances ``d(M(x), M(R(x, y)))``
(positives) and ``d(M(x), M(R(x, y′)))`` (one random wrong label per image, negatives),
``val/auroc`` of telling them apart (torchmetrics), ``val/d_pos``, ``val/d_neg``, and each
validation's histogram of both distributions as PNG (``hist/step<N>.png``) and to W&B.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mixdefense.attacks import run_attack
from mixdefense.classifiers import load_classifier
from mixdefense.evaluation.plots import score_histograms
from mixdefense.metrics import detection_auroc
from mixdefense.nets.cgan import load_cgan
from mixdefense.nets.metric import EmbeddingNet, embedding_distance
from mixdefense.triplets import (
    TRIPLET_MODES,
    ReferenceBank,
    TripletObjective,
    adversarial_anchors,
    reconstruction_references,
    reference_owners,
    sample_confusable_labels,
    sample_wrong_labels,
)


class MetricModule(pl.LightningModule):
    """Triplet training of the embedding net M with a frozen cGAN (see the module docstring).

    Args:
        cgan: path of the exported cGAN (``artifacts/<ds>/cgan.pt``).
        embedding_dim, arch, channels: M's architecture (:class:`mixdefense.nets.EmbeddingNet`).
        margin, distance, miner, miner_margin: the triplet objective (:class:`mixdefense.triplets.TripletObjective`).
        triplets: ``"batch"`` or ``"paper"`` (see the module docstring).
        negatives_per_image: wrong-label reconstructions per image (``num_classes − 1``: all).
        anchor_noise: maximal amplitude of the uniform noise on anchors (0: none).
        classifier: path of the dataset's classifier (``artifacts/<ds>/classifier.pt``) for confusable negatives.
        confusable_negatives: how many of the ``negatives_per_image`` come from the classifier's
            ``confusable_top_k`` highest-scoring wrong labels (0: all uniform).
        lr, weight_decay: AdamW, cosine-annealed per step over the trainer's planned steps.
        adversarial_anchors: images per batch also used as PGD AEs (anchors; 0: none; needs ``classifier``).
        adversarial_eps: ``(low, high)`` L∞ budget range in ``[0, 1]`` pixel units, one ε per batch.
        adversarial_steps: PGD steps for the training AEs (and the validation ones).
        adversarial_val_eps: L∞ budget of validation AEs for ``val/auroc_adversarial`` (needs ``classifier``; ``None``: not logged).
        reference_latent_noise: ``τ``: training references are ``G(μ + τ·σ·ε, label)`` instead of
            ``G(μ, label)`` (0: off; validation always uses ``μ``), so M meets positives as loose as
            those of images the cGAN never saw (see :func:`mixdefense.triplets.reconstruction_references`).
        channels_last: keep the frozen cGAN, the classifier and M in channels-last (NHWC) memory
            format: the same float32 model, faster oneDNN convolutions on a CPU.
        reference_bank: precompute the training references once (see the module docstring;
            incompatible with ``adversarial_anchors`` and ``reference_latent_noise``).
        bank_uniform_negatives: uniform wrong labels per image in the bank (at least
            ``negatives_per_image − confusable_negatives``).
    """

    def __init__(self, cgan: str, embedding_dim: int = 12, arch: str = "cnn", channels: tuple[int, ...] = (32, 64, 128),
                 margin: float = 0.7, distance: str = "l2", miner: str = "all", miner_margin: float | None = None,
                 negatives_per_image: int = 9, anchor_noise: float = 0.0, lr: float = 1e-3, weight_decay: float = 1e-4,
                 classifier: str | None = None, confusable_negatives: int = 0, confusable_top_k: int = 5,
                 channels_last: bool = False, adversarial_anchors: int = 0,
                 adversarial_eps: tuple[float, float] = (1 / 255, 8 / 255), adversarial_steps: int = 2,
                 adversarial_val_eps: float | None = None, reference_latent_noise: float = 0.0,
                 reference_bank: bool = False, bank_uniform_negatives: int = 3, triplets: str = "batch"):
        super().__init__()
        if triplets not in TRIPLET_MODES:
            raise ValueError(f"triplets must be one of {TRIPLET_MODES}, got {triplets!r}")
        if not Path(cgan).exists():
            raise FileNotFoundError(f"cGAN not found: {cgan} (train it first: make train-cgan DATASET=...)")
        self.save_hyperparameters()
        self.reconstructor = load_cgan(cgan).requires_grad_(False)
        self.num_classes = self.reconstructor.num_classes
        if not 1 <= negatives_per_image <= self.num_classes - 1:
            raise ValueError(f"negatives_per_image must be in [1, {self.num_classes - 1}], got {negatives_per_image}")
        if confusable_negatives and classifier is None:
            raise ValueError("confusable_negatives needs the dataset's classifier (classifier: artifacts/<ds>/classifier.pt)")
        if not 0 <= confusable_negatives <= min(negatives_per_image, confusable_top_k):
            raise ValueError(f"confusable_negatives must be in [0, min(negatives_per_image, confusable_top_k)], "
                             f"got {confusable_negatives}")
        if adversarial_anchors and classifier is None:
            raise ValueError("adversarial_anchors needs the dataset's classifier (classifier: artifacts/<ds>/classifier.pt)")
        if adversarial_anchors < 0 or adversarial_steps < 1:
            raise ValueError(f"need adversarial_anchors >= 0 and adversarial_steps >= 1, "
                             f"got {adversarial_anchors} and {adversarial_steps}")
        low, high = adversarial_eps
        if not 0 < low <= high <= 1:
            raise ValueError(f"adversarial_eps must satisfy 0 < low <= high <= 1 (pixel scale), got {adversarial_eps}")
        if adversarial_val_eps is not None and (classifier is None or not 0 < adversarial_val_eps <= 1):
            raise ValueError(f"adversarial_val_eps needs the classifier and must be in (0, 1], got {adversarial_val_eps}")
        if reference_latent_noise < 0:
            raise ValueError(f"reference_latent_noise must be >= 0, got {reference_latent_noise}")
        if reference_bank and (adversarial_anchors or reference_latent_noise):
            raise ValueError("reference_bank holds fixed references of clean images: it cannot be combined with "
                             "adversarial_anchors or reference_latent_noise")
        if reference_bank and not negatives_per_image - confusable_negatives <= bank_uniform_negatives <= self.num_classes - 1 - (
                confusable_top_k if confusable_negatives else 0):
            raise ValueError(f"bank_uniform_negatives must cover the {negatives_per_image - confusable_negatives} uniform "
                             f"negatives per image and leave labels to draw them from, got {bank_uniform_negatives}")
        if classifier is not None and not Path(classifier).exists():
            raise FileNotFoundError(f"classifier not found: {classifier} (make train-classifier DATASET=...)")
        # frozen and not a registered submodule: not in M's checkpoint weights, never trained
        self._classifier = [load_classifier(classifier).requires_grad_(False).eval()] if classifier else []
        self.metric = EmbeddingNet(self.reconstructor.in_channels, embedding_dim, arch, channels)
        self.objective = TripletObjective(margin, distance, miner, miner_margin, triplets)
        self._val: dict[str, list[torch.Tensor]] = {}
        self.bank: ReferenceBank | None = None

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:  # in place, before configure_optimizers
            for net in (self.reconstructor, self.metric, *self._classifier):
                net.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True):
        super().train(mode)
        self.reconstructor.eval()  # frozen, batch norm in inference mode
        return self

    def on_train_start(self) -> None:
        """Build the reference bank (after the trainer's timer has started: it counts in ``max_time``)."""
        if not self.hparams.reference_bank or self.bank is not None:
            return
        data = getattr(self.trainer.datamodule, "data_train", None)
        if data is None or not getattr(data, "with_index", False):
            raise RuntimeError("reference_bank needs a datamodule with indexed training batches "
                               "(data.init_args.train_indices: true)")
        if getattr(self.trainer.datamodule, "augment", False):
            raise RuntimeError("reference_bank needs the training images unaugmented (data.init_args.augment: false)")
        loader = DataLoader(data, batch_size=256, shuffle=False)
        batches = ((x.to(self.device).contiguous(memory_format=self._memory_format), y.to(self.device))
                   for x, y, _ in loader)
        confusable = bool(self.hparams.confusable_negatives)
        self.bank = ReferenceBank.build(
            self.reconstructor, batches, self.num_classes, self.hparams.bank_uniform_negatives,
            classifier=self._classifier[0].to(self.device) if confusable else None,
            top_k=self.hparams.confusable_top_k if confusable else 0,
            generator=torch.Generator().manual_seed(torch.initial_seed() % 2**63),
            progress=self.trainer.progress_bar_callback is not None)

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.hparams.channels_last else torch.contiguous_format

    def _anchors(self, x: torch.Tensor) -> torch.Tensor:
        a = self.hparams.anchor_noise
        if a <= 0 or not self.training:
            return x
        amp = torch.rand(x.shape[0], 1, 1, 1, device=x.device) * a
        return (x + amp * (2 * torch.rand_like(x) - 1)).clamp(0, 1)

    @torch.no_grad()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        clf = self._classifier[0].to(x.device)
        return clf(x)

    def _wrong_labels(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        k = self.hparams.confusable_negatives
        if not k:
            return None
        return sample_confusable_labels(self._logits(x), y, self.hparams.negatives_per_image, k,
                                        self.hparams.confusable_top_k)

    def _adversarial_triplets(self, x: torch.Tensor, y: torch.Tensor):
        """PGD anchors for the first ``adversarial_anchors`` images and their two references each."""
        k = self.hparams.adversarial_anchors
        x, y = x[:k], y[:k]
        low, high = self.hparams.adversarial_eps
        eps = low + (high - low) * torch.rand(()).item()
        x_adv, y_adv = adversarial_anchors(self._classifier[0].to(x.device), x, y, eps, self.hparams.adversarial_steps)
        refs, ref_labels = reconstruction_references(self.reconstructor, x_adv, y, self.num_classes, 1,
                                                     wrong_labels=y_adv[:, None])
        return x_adv, y, refs, ref_labels

    def _references(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, references, reference labels)`` of a training batch, from the bank or the cGAN."""
        if not self.hparams.reference_bank:
            x, y = batch[:2]
            refs, ref_labels = reconstruction_references(self.reconstructor, x, y, self.num_classes,
                                                         self.hparams.negatives_per_image,
                                                         wrong_labels=self._wrong_labels(x, y),
                                                         latent_noise=self.hparams.reference_latent_noise)
            return x, y, refs, ref_labels
        if len(batch) != 3 or self.bank is None:
            raise RuntimeError("reference_bank needs (x, y, index) batches (data.init_args.train_indices: true) "
                               "and the bank built by on_train_start")
        x, y, index = batch
        self.bank.check(index, x)
        refs, ref_labels = self.bank.sample(index, self.hparams.negatives_per_image, self.hparams.confusable_negatives)
        return x, y, refs.contiguous(memory_format=self._memory_format), ref_labels

    def training_step(self, batch, batch_idx):
        x, y, refs, ref_labels = self._references(batch)
        anchors, anchor_labels = self._anchors(x), y
        owners = reference_owners(len(x), self.hparams.negatives_per_image, x.device)  # per-image triplets ("paper")
        if self.hparams.adversarial_anchors:
            x_adv, y_adv_anchor, adv_refs, adv_labels = self._adversarial_triplets(x, y)
            adv_owners = len(x) + torch.arange(len(x_adv), device=x.device)  # R(x_adv, y) then R(x_adv, y_adv)
            anchors, anchor_labels = torch.cat([anchors, x_adv]), torch.cat([y, y_adv_anchor])
            refs, ref_labels = torch.cat([refs, adv_refs]), torch.cat([ref_labels, adv_labels])
            owners = torch.cat([owners, adv_owners, adv_owners])
        emb = self.metric(torch.cat([anchors, refs])).float()
        with torch.autocast(self.device.type, enabled=False):  # distances and loss in float32 under bf16-mixed
            stats = self.objective(emb[: len(anchors)], anchor_labels, emb[len(anchors):], ref_labels, owners)
        if not torch.isfinite(stats.loss):
            raise FloatingPointError(f"metric training diverged: loss {stats.loss.item()}")
        self.log_dict({"train/loss": stats.loss, "train/active": stats.active_fraction,
                       "train/mined": float(stats.num_mined)}, prog_bar=True, on_step=True, on_epoch=True)
        return stats.loss

    @torch.no_grad()
    def pair_distances(self, x: torch.Tensor, y: torch.Tensor, *y_wrongs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(d(M(x), M(R(x, y))), d(M(x), M(R(x, y′))) for each y′ in y_wrongs)``, each ``[B]``;
        ``x``'s latent and embedding are computed once for all of them."""
        mu = self.reconstructor.encoder(x)[0]
        e_x = self.metric(x).float()
        return tuple(embedding_distance(e_x, self.metric(self.reconstructor.generator(mu, labels)).float(),
                                        self.hparams.distance)
                     for labels in (y, *y_wrongs))

    def validation_step(self, batch, batch_idx):
        x, y = batch[:2]
        y_wrong = sample_wrong_labels(y, self.num_classes, 1, torch.Generator().manual_seed(batch_idx))[:, 0]
        wrongs = [y_wrong]
        if self._classifier:
            wrongs.append(sample_confusable_labels(self._logits(x), y, 1, 1, 1)[:, 0])  # the top wrong label
        d_pos, d_neg, *d_top = self.pair_distances(x, y, *wrongs)
        self._val["pos"].append(d_pos.cpu())
        self._val["neg"].append(d_neg.cpu())
        if d_top:
            self._val["neg_confusable"].append(d_top[0].cpu())
            if self.hparams.adversarial_val_eps is not None:
                self._val["adversarial"].append(self._adversarial_scores(x, y).cpu())

    def _adversarial_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``d(M(x_adv), M(R(x_adv, ŷ)))`` for the successful PGD AEs (ε = the validation budget) of ``x``."""
        with torch.inference_mode(False), torch.enable_grad():  # Lightning validates in inference mode
            x_adv = run_attack("pgd_linf", self._classifier[0].to(x.device), x.clone(), y.clone(),
                               self.hparams.adversarial_val_eps, steps=self.hparams.adversarial_steps)
        pred = self._logits(x_adv).argmax(1)  # the label ContraNet is handed
        hit = pred != y
        if not hit.any():
            return x_adv.new_zeros(0)
        return self.pair_distances(x_adv[hit], pred[hit])[0]

    def on_validation_epoch_start(self):
        self._val = {"pos": [], "neg": [], "neg_confusable": [], "adversarial": []}

    def on_validation_epoch_end(self):
        if not self._val.get("pos"):
            return
        pos, neg = torch.cat(self._val["pos"]), torch.cat(self._val["neg"])
        auroc = detection_auroc(pos, neg)
        self.log_dict({"val/auroc": auroc, "val/d_pos": pos.mean().item(), "val/d_neg": neg.mean().item()},
                      prog_bar=True, sync_dist=True)
        if self._val["neg_confusable"]:
            self.log("val/auroc_confusable", detection_auroc(pos, torch.cat(self._val["neg_confusable"])),
                     prog_bar=True, sync_dist=True)
            adversarial = torch.cat(self._val["adversarial"] or [torch.zeros(0)])
            if len(adversarial):
                self.log("val/auroc_adversarial", detection_auroc(pos, adversarial), prog_bar=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "hist"
        path = score_histograms({"true label (positive)": pos, "wrong label (negative)": neg}, None,
                                folder / f"step{self.global_step:07d}.png", log=False, xlabel="d(M(x), M(G(E(x), label)))",
                                title=f"step {self.global_step}: AUROC {auroc:.4f}")
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("val/distances", [str(path)], step=self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.metric.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

"""Triplets for ContraNet's deep metric model (paper §4.2, eq. 6), on pytorch-metric-learning.

For a batch of clean images ``x [B, C, S, S]`` (in ``[0, 1]``) with labels ``y`` and the frozen
cGAN's reconstructor ``R(x, y) = G(μ(x), y)``:

* **anchors** are the clean images ``x`` (label ``y``);
* **references** are reconstructions: ``R(x, y)`` (label ``y``, the paper's *positives*) and
  ``R(x, y′)`` for ``n`` distinct wrong labels ``y′ ≠ y`` per image (label ``y′``, the paper's
  *negatives*).

Which (anchor, positive, negative) triplets eq. 6 sees is :class:`TripletObjective`'s
``triplets`` mode (:data:`TRIPLET_MODES`):

* ``"batch"`` (the default; MixDefense+'s shipped configs): every label-valid triplet of the
  batch: anchor ``x_i``, positive any reconstruction drawn *as* ``y_i`` (mostly *other*
  images' ``R(x_j, y_i)``, wrong-label ones ``R(x_j, y′ = y_i)`` included), negative any
  reconstruction drawn as another class — so an anchor's own wrong-label reconstructions
  ``R(x_i, y′)`` are always among its negatives and a reconstruction labelled ``y_i`` never is
  (:func:`sample_wrong_labels` never returns the true label).
* ``"paper"`` (the paper's §4.2, the ``paper`` variant): per image only: anchor ``M(x_i)``,
  positive ``M(R(x_i, y_i))`` of *the same image*, negatives ``M(R(x_i, y′))``, that image's
  wrong-label reconstructions (:func:`image_triplets`; which reference belongs to which
  image is the ``ref_owners`` vector, :func:`reference_owners` for the layout of
  :func:`reconstruction_references`).  The miner (``semihard`` in the paper-variant configs,
  as in the authors' code) chooses among those triplets only.  (The paper's "all possible
  triplet combinations are used ... according to the labels" and its "hard sample miner"
  leave room: this mode follows its description of the triplet — clean image, its own
  reconstructions with the correct and with wrong labels — and the authors' semihard miner.)

A ``TripletMarginMiner`` (``all`` / ``semihard`` / ``hard``) keeps triplets by their margin
``d(a, n) − d(a, p)`` (``all``: ``≤ m``, i.e. every violating triplet; ``semihard``:
``0 < · ≤ m``, i.e. ``d(a, p) < d(a, n) ≤ d(a, p) + m``; ``hard``: ``≤ 0``), and
``TripletMarginLoss`` (eq. 6) averages over the non-zero losses (PML's ``AvgNonZeroReducer``;
with the ``all`` miner at the loss margin the mining therefore changes nothing).  Distances: ``l2`` (Euclidean
on the embeddings, PML's ``LpDistance``) or ``cosine`` (``1 − cos``; PML's ``CosineSimilarity``).

Adversarial anchors (optional; the authors' follow-up code fine-tunes its metric model with PGD
AEs, see ``facts.md``): :func:`adversarial_anchors` turns clean training images into L∞ PGD
AEs against the target classifier; such an ``x_adv`` is an anchor of its *true* label ``y``
whose negative is ``R(x_adv, y_adv)``, the reconstruction with the wrong label the classifier
now scores highest (the label ContraNet is handed at inference when the attack succeeds), and
whose positive is ``R(x_adv, y)``: M learns that a few pixel-scale perturbations do not make an
image of ``y`` look like a ``y_adv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from pytorch_metric_learning import distances, losses, miners
from tqdm.auto import tqdm

from mixdefense.attacks import run_attack
from mixdefense.nets.metric import DISTANCES

MINER_TYPES = ("all", "semihard", "hard")
TRIPLET_MODES = ("batch", "paper")


def sample_wrong_labels(y: torch.Tensor, num_classes: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, n]`` distinct labels per row, uniform among the ``num_classes − 1`` labels ``≠ y``.

    ``n = num_classes − 1`` gives every wrong label (in a random order).
    """
    if not 1 <= n <= num_classes - 1:
        raise ValueError(f"need 1 <= n <= num_classes - 1 = {num_classes - 1} wrong labels per image, got {n}")
    shifts = torch.rand(y.shape[0], num_classes - 1, generator=generator, device="cpu").argsort(1)[:, :n] + 1
    return (y[:, None] + shifts.to(y.device)) % num_classes


def sample_confusable_labels(logits: torch.Tensor, y: torch.Tensor, n: int, n_confusable: int, top_k: int,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, n]`` distinct wrong labels per row, the first ``n_confusable`` of them *confusable*.

    Confusable labels are drawn at random among the ``top_k`` wrong labels a classifier scores
    highest for the image (``logits [B, num_classes]``, from clean images): the classes an
    adversarial example is most likely to be pushed into, whose reconstructions differ from
    the image in details (a speed limit's digits) rather than in shape and colour.  The other
    ``n − n_confusable`` labels are uniform among the remaining wrong ones.  Never ``y``.
    """
    b, num_classes = logits.shape
    if not 0 <= n_confusable <= min(n, top_k) or not 1 <= n <= num_classes - 1 or not 1 <= top_k <= num_classes - 1:
        raise ValueError(f"need 0 <= n_confusable ({n_confusable}) <= min(n ({n}), top_k ({top_k})), "
                         f"1 <= n, top_k <= num_classes - 1 = {num_classes - 1}")
    rows = torch.arange(b, device=logits.device)
    masked = logits.detach().float().clone()
    masked[rows, y] = -torch.inf
    top = masked.topk(top_k, dim=1).indices  # [B, k], never y
    pick = torch.rand(b, top_k, generator=generator, device="cpu").argsort(1)[:, :n_confusable].to(logits.device)
    confusable = top.gather(1, pick)
    score = torch.rand(b, num_classes, generator=generator, device="cpu").to(logits.device)
    score[rows, y] = -1.0  # rand is in [0, 1): masked labels are never among the top
    score.scatter_(1, confusable, -1.0)
    return torch.cat([confusable, score.topk(n - n_confusable, dim=1).indices], 1)


def adversarial_anchors(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 2,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_adv [B, C, S, S], y_adv [B])``: L∞ PGD AEs of ``x`` (in ``[0, 1]``) against ``classifier``.

    ``eps`` bounds ``‖x_adv − x‖∞`` in ``[0, 1]`` pixel units (random start, ``steps`` steps of
    ``2.5·eps/steps``, :func:`mixdefense.attacks.run_attack`); ``y_adv`` is the wrong label the
    classifier scores highest for ``x_adv`` (its prediction where the attack succeeded, else the
    class the attack was heading for) and never ``y``.  Needs gradients enabled.
    """
    x_adv = run_attack("pgd_linf", classifier, x, y, eps, steps=steps)
    with torch.no_grad():
        y_adv = sample_confusable_labels(classifier(x_adv), y, 1, 1, 1)[:, 0]
    return x_adv, y_adv


@torch.no_grad()
def reconstruction_references(reconstructor: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                              negatives_per_image: int, generator: torch.Generator | None = None,
                              wrong_labels: torch.Tensor | None = None, latent_noise: float = 0.0,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(references [B·(1+n), C, S, S], labels [B·(1+n)])``: ``R(x, y)`` first, then ``R(x, y′)``.

    ``reconstructor`` exposes ``encoder`` (``x → (μ, log σ²)``) and ``generator`` (``(z, y) → image``);
    the encoder runs once per image.  No gradient flows (the cGAN is frozen).  The wrong labels
    are ``wrong_labels [B, n]`` when given (e.g. :func:`sample_confusable_labels`), else uniform.
    ``latent_noise = τ > 0`` draws the latent ``z = μ + τ·σ·ε`` (``ε ~ N(0, I)``, one ``z`` per
    image, shared by its positive and negatives) instead of ``μ``: reconstructions as imperfect
    as those of images the cGAN never saw, while the label still decides the class content.
    """
    if latent_noise < 0:
        raise ValueError(f"latent_noise must be >= 0, got {latent_noise}")
    if latent_noise > 0:
        z = reconstructor.encoder.sample(x, generator, scale=latent_noise)[0]
    else:
        z = reconstructor.encoder(x)[0]  # μ
    positives = reconstructor.generator(z, y)
    if wrong_labels is None:
        wrong_labels = sample_wrong_labels(y, num_classes, negatives_per_image, generator)
    if wrong_labels.shape != (len(y), negatives_per_image) or (wrong_labels == y[:, None]).any():
        raise ValueError(f"wrong_labels must be [B, {negatives_per_image}] and never the true label")
    y_neg = wrong_labels.flatten()
    negatives = reconstructor.generator(z.repeat_interleave(negatives_per_image, 0), y_neg)
    return torch.cat([positives, negatives]), torch.cat([y, y_neg])


def reference_owners(num_images: int, negatives_per_image: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[B·(1+n)]``: the image (anchor index) each reference of :func:`reconstruction_references`'
    layout (and :meth:`ReferenceBank.sample`'s) was reconstructed from: ``0 … B−1`` for the
    positives, then each image's index ``n`` times for its negatives (image-major)."""
    images = torch.arange(num_images, device=device)
    return torch.cat([images, images.repeat_interleave(negatives_per_image)])


def image_triplets(anchor_labels: torch.Tensor, ref_labels: torch.Tensor, ref_owners: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, p, n)`` index tensors of every *per-image* triplet (the ``"paper"`` mode's candidates).

    Anchor ``a`` (an index into the anchors), positive ``p`` a reference of the same image
    (``ref_owners[p] == a``) drawn with the anchor's label, negative ``n`` a reference of the same
    image drawn with another label: ``(M(x_a), M(R(x_a, y_a)), M(R(x_a, y′)))``.  No triplet uses
    another image's reconstruction.
    """
    anchors = torch.arange(len(anchor_labels), device=anchor_labels.device)
    own = ref_owners[None, :] == anchors[:, None]  # [A, R]
    same_label = anchor_labels[:, None] == ref_labels[None, :]
    pa, pp = torch.where(own & same_label)
    na, nn_ = torch.where(own & ~same_label)
    i, j = torch.where(pa[:, None] == na[None, :])  # join on the anchor
    return pa[i], pp[i], nn_[j]


def pml_distance(name: str) -> distances.BaseDistance:
    """PML distance object for ``"l2"`` or ``"cosine"``."""
    if name == "l2":
        return distances.LpDistance(p=2, normalize_embeddings=True)
    if name == "cosine":
        return distances.CosineSimilarity()
    raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")


@dataclass
class TripletStats:
    """What one batch's triplet objective saw (for logging)."""

    loss: torch.Tensor
    num_triplets: int  # all candidate triplets: label-valid in the batch ("batch"), per image ("paper")
    num_mined: int  # those the miner kept
    active_fraction: float  # share of all valid triplets with a positive loss (margin violated)


class TripletObjective(nn.Module):
    """Eq. 6 over mined triplets: ``TripletMarginMiner`` + ``TripletMarginLoss`` sharing one distance.

    Args:
        margin: the triplet loss margin (the authors' follow-up code: 0.7 with L2).
        distance: ``"l2"`` or ``"cosine"``.
        miner: ``"all"`` (every margin-violating triplet), ``"semihard"`` or ``"hard"``.
        miner_margin: the miner's margin (default: ``margin``).
        triplets: ``"batch"`` (every label-valid triplet of the batch) or ``"paper"`` (per image:
            the anchor's own true-label and wrong-label reconstructions; needs ``ref_owners``).
            See the module docstring.
    """

    def __init__(self, margin: float = 0.7, distance: str = "l2", miner: str = "all", miner_margin: float | None = None,
                 triplets: str = "batch"):
        super().__init__()
        if miner not in MINER_TYPES:
            raise ValueError(f"unknown miner {miner!r}; choose one of {MINER_TYPES}")
        if triplets not in TRIPLET_MODES:
            raise ValueError(f"unknown triplets mode {triplets!r}; choose one of {TRIPLET_MODES}")
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        self.distance_name = distance
        self.triplets = triplets
        dist = pml_distance(distance)
        self.miner = miners.TripletMarginMiner(margin=margin if miner_margin is None else miner_margin,
                                               type_of_triplets=miner, distance=dist)
        self.loss = losses.TripletMarginLoss(margin=margin, distance=dist)
        self.margin = margin

    def forward(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, refs: torch.Tensor,
                ref_labels: torch.Tensor, ref_owners: torch.Tensor | None = None) -> TripletStats:
        """Loss over triplets (anchor from ``anchors [A, D]``, positive and negative from ``refs [R, D]``).

        ``ref_owners [R]`` (the anchor index each reference was reconstructed from) is needed in
        ``"paper"`` mode and ignored in ``"batch"`` mode.
        """
        if self.triplets == "paper":
            return self._per_image(anchors, anchor_labels, refs, ref_labels, ref_owners)
        triplets = self.miner(anchors, anchor_labels, refs, ref_labels)
        loss = self.loss(anchors, anchor_labels, triplets, refs, ref_labels)
        with torch.no_grad():
            matches = anchor_labels[:, None] == ref_labels[None, :]
            pos = matches.sum(1)
            total = int((pos * (~matches).sum(1)).sum())
            # every valid triplet's loss > 0  ⇔  d(a, p) − d(a, n) + margin > 0
            d = self._distances(anchors, refs)
            inf = torch.tensor(float("inf"), device=d.device)
            d_pos = torch.where(matches, d, -inf)  # [B, R]
            d_neg = torch.where(matches, inf, d)
            violated = (d_pos[:, :, None] - d_neg[:, None, :] + self.margin > 0) & matches[:, :, None] & ~matches[:, None, :]
            active = int(violated.sum())
        return TripletStats(loss, total, int(triplets[0].numel()), active / max(total, 1))

    def _distances(self, anchors: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """``[A, R]`` distances (smaller = closer, whatever the PML distance)."""
        d = self.miner.distance(anchors, refs)
        return -d if self.miner.distance.is_inverted else d  # similarity: larger = closer

    def mine_per_image(self, anchors: torch.Tensor, anchor_labels: torch.Tensor, refs: torch.Tensor,
                       ref_labels: torch.Tensor, ref_owners: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The miner's choice among the per-image triplets of :func:`image_triplets` (``"paper"`` mode).

        PML's miner pairs anchors and references by label; to keep it to one image it is handed
        *mining labels*: anchor ``i`` is labelled ``i``, so is each of its own positives, and every
        other reference gets a label of its own that no anchor has.  Its candidates are then
        ``(i, own positive, any other reference)``; PML's rule (``semihard``: ``d(a, p) < d(a, n) ≤
        d(a, p) + m``) selects among them, and the negatives not of image ``i`` are dropped.
        """
        num_anchors, num_refs = len(anchors), len(refs)
        if ref_owners is None or ref_owners.shape != ref_labels.shape:
            raise ValueError("triplets='paper' needs ref_owners [R]: the anchor index each reference was "
                             "reconstructed from (mixdefense.triplets.reference_owners)")
        if len(ref_owners) and not (0 <= int(ref_owners.min()) and int(ref_owners.max()) < num_anchors):
            raise ValueError(f"ref_owners must index the {num_anchors} anchors")
        positive = ref_labels == anchor_labels[ref_owners]
        if not torch.isin(torch.arange(num_anchors, device=ref_owners.device), ref_owners[positive]).all():
            raise ValueError("triplets='paper': every anchor needs its own true-label reconstruction among the references")
        anchor_ids = torch.arange(num_anchors, device=anchors.device)
        unique = num_anchors + torch.arange(num_refs, device=refs.device)  # labels no anchor has
        mining_labels = torch.where(positive, ref_owners, unique)
        a, p, n = self.miner(anchors, anchor_ids, refs, mining_labels)
        keep = ref_owners[n] == a  # the negative is the anchor's own wrong-label reconstruction
        return a[keep], p[keep], n[keep]

    def _per_image(self, anchors, anchor_labels, refs, ref_labels, ref_owners) -> TripletStats:
        triplets = self.mine_per_image(anchors, anchor_labels, refs, ref_labels, ref_owners)
        loss = self.loss(anchors, anchor_labels, triplets, refs, ref_labels)
        with torch.no_grad():
            a, p, n = image_triplets(anchor_labels, ref_labels, ref_owners)
            d = self._distances(anchors, refs)
            active = int((d[a, p] - d[a, n] + self.margin > 0).sum())
        return TripletStats(loss, len(a), int(triplets[0].numel()), active / max(len(a), 1))


class ReferenceBank:
    """Precomputed reconstructions of a fixed training set: the frozen cGAN runs once, not every epoch.

    A reference ``R(x, label) = G(μ(x), label)`` depends only on the image and the label, so for
    a training set without random augmentation (random noise on the *anchors* is fine) the
    references of many epochs are the same few per image.  The bank holds, for image ``i`` of
    the training set (in its dataset order):

    * column 0: ``R(x_i, y_i)``, the positive;
    * columns ``1 … k``: ``R(x_i, c)`` for the ``k = top_k`` wrong labels the classifier scores
      highest for ``x_i`` (only when built with a classifier), the confusable negatives;
    * the last ``u = uniform`` columns: ``R(x_i, y′)`` for ``u`` distinct wrong labels drawn
      uniformly among the others, fixed per image at build time.

    :meth:`sample` draws a batch's references from it in :func:`reconstruction_references`'
    layout, the negatives re-drawn among each image's columns at every step.  The cached
    references are the float32 cGAN's outputs (the ones ContraNet computes at inference)
    stored in ``dtype`` (float16 by default: ~6 KB per 3×32×32 image and column).

    Attributes:
        references: ``[N, 1 + k + u, C, S, S]`` in ``[0, 1]``.
        labels: ``[N, 1 + k + u]`` int64, column 0 the true label.
        num_confusable: ``k``.
        checksums: ``[N]`` float64 pixel sums of the images, to refuse a batch that is not the
            bank's image (augmented, reordered or another dataset; :meth:`check`).
    """

    def __init__(self, references: torch.Tensor, labels: torch.Tensor, num_confusable: int, checksums: torch.Tensor):
        if references.dim() != 5 or labels.shape != references.shape[:2] or checksums.shape != references.shape[:1]:
            raise ValueError(f"need references [N, K, C, S, S], labels [N, K] and checksums [N], got "
                             f"{tuple(references.shape)}, {tuple(labels.shape)}, {tuple(checksums.shape)}")
        if not 0 <= num_confusable < references.shape[1]:
            raise ValueError(f"num_confusable must be in [0, {references.shape[1] - 1}], got {num_confusable}")
        self.references, self.labels, self.num_confusable, self.checksums = references, labels, num_confusable, checksums

    @property
    def num_uniform(self) -> int:
        return self.labels.shape[1] - 1 - self.num_confusable

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    @torch.no_grad()
    def build(cls, reconstructor: nn.Module, batches, num_classes: int, uniform: int,
              classifier: nn.Module | None = None, top_k: int = 0, generator: torch.Generator | None = None,
              dtype: torch.dtype = torch.float16, progress: bool = True, chunk: int = 64) -> ReferenceBank:
        """Bank of the images of ``batches`` (an iterable of ``(x [B, C, S, S] in [0, 1], y [B])`` in
        the dataset's order, on the reconstructor's device): ``top_k`` confusable columns (needs
        ``classifier``) and ``uniform`` uniform ones per image.  The generator runs on ``chunk``
        latents at a time (64: ~2x faster per image than thousands at once on a CPU)."""
        if (classifier is None) != (top_k == 0):
            raise ValueError("confusable columns need both a classifier and top_k >= 1 (or neither)")
        if uniform < 0 or not 1 <= top_k + uniform <= num_classes - 1:
            raise ValueError(f"need uniform >= 0 and 1 <= top_k + uniform <= {num_classes - 1}, got top_k {top_k}, "
                             f"uniform {uniform}")
        refs, labels, sums = [], [], []
        for x, y in tqdm(batches, desc="reference bank", disable=not progress, leave=False):
            if classifier is not None:
                wrong = sample_confusable_labels(classifier(x), y, top_k + uniform, top_k, top_k, generator)
            else:
                wrong = sample_wrong_labels(y, num_classes, uniform, generator)
            lab = torch.cat([y[:, None], wrong], 1)  # [B, K]
            mu = reconstructor.encoder(x)[0]
            z, flat = mu.repeat_interleave(lab.shape[1], 0), lab.flatten()
            out = torch.cat([reconstructor.generator(zc, lc).to("cpu", dtype)
                             for zc, lc in zip(z.split(chunk), flat.split(chunk))])
            refs.append(out.reshape(*lab.shape, *x.shape[1:]).contiguous())
            labels.append(lab.cpu())
            sums.append(x.double().flatten(1).sum(1).cpu())
        if not refs:
            raise ValueError("ReferenceBank.build: no images")
        return cls(torch.cat(refs), torch.cat(labels), top_k, torch.cat(sums))

    def check(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Raise unless ``x [B, C, S, S]`` are the bank's images ``index [B]`` (pixel sums within 1e-3)."""
        sums = x.detach().double().flatten(1).sum(1).cpu()
        if not torch.allclose(sums, self.checksums[index.cpu()], rtol=0, atol=1e-3):
            raise RuntimeError("the batch's images are not the reference bank's: the bank needs the training set "
                               "unaugmented and in the order it was built from (datamodule augment: false)")

    def sample(self, index: torch.Tensor, negatives_per_image: int, confusable_negatives: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(references [B·(1+n), C, S, S] float32, labels [B·(1+n)])`` of the bank's images ``index [B]``:
        the positives first, then ``n = negatives_per_image`` negatives per image (image-major), the
        first ``confusable_negatives`` of each image's drawn among its confusable columns and the
        others among its uniform ones, distinct, never the true label."""
        k, u, n = self.num_confusable, self.num_uniform, negatives_per_image
        if not 0 <= confusable_negatives <= min(k, n) or not 0 <= n - confusable_negatives <= u or n < 1:
            raise ValueError(f"the bank holds {k} confusable and {u} uniform negatives per image; cannot draw "
                             f"{n} negatives with {confusable_negatives} confusable")
        idx = index.cpu()
        b = len(idx)
        conf = torch.rand(b, k, generator=generator).argsort(1)[:, :confusable_negatives] + 1
        unif = torch.rand(b, u, generator=generator).argsort(1)[:, :n - confusable_negatives] + 1 + k
        cols = torch.cat([conf, unif], 1)  # [B, n]
        rows = idx[:, None]
        refs = torch.cat([self.references[idx, 0].float(), self.references[rows, cols].flatten(0, 1).float()])
        labels = torch.cat([self.labels[idx, 0], self.labels[rows, cols].flatten()])
        return refs.to(index.device), labels.to(index.device)

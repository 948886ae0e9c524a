"""Training of the revised cGAN with Algorithm 1 (paper §4.1): per batch update G, then E, then D.

Manual optimisation with three optimizers.  Losses (eqs. 3–5):

* G: ``w_adv · adv_G(D(G(z, y), y)) + Dist(G(z, y), x)`` with ``z ~ q(z|x)`` (E frozen);
  with ``wrong_label_adv`` also ``w_adv · adv_G(D(G(z, y′), y′))`` for random wrong labels
  ``y′`` — the term that pushes G to obey the label (D sees those fakes with ``y′``).
* E: ``Dist(G(z, y), x) + w_kl · KL(q(z|x) ‖ N(0, I))`` (G frozen).
* D (``d_steps`` times): real ``(x, y)`` against fake ``(G(z, y), y)`` (and ``(G(z, y′), y′)``).

With ``mismatch_fake`` D also sees *real* images with random wrong labels ``(x, y′)`` as
fake (the "matching-aware" discriminator of Reed et al. 2016): the projection term then
learns what each class looks like, so G's wrong-label adversarial term pushes ``G(z, y′)``
toward class ``y′``.  Scoring ``(x, y′)`` reuses ``φ(x)``: it costs no convolution.

With ``w_cls > 0`` D also has an auxiliary class critic (AC-GAN style; a small CNN), trained by
cross-entropy on *real* images only, and G gets ``w_cls · CE(c(G(z, y′)), y′)`` (and the same
for the true label): the label-binding term.  It acts where the projection term is weak:
a latent rich enough for faithful reconstructions also carries the class, and G can then
ignore ``y``; the class critic asks G to draw what ``y`` says.

``Dist = w_l2 · MSE + w_ssim · (1 − SSIM)`` (torchmetrics SSIM, data range 1).  ``adv_loss``:
``"hinge"`` (D: ``relu(1 − D(real)) + relu(1 + D(fake))``, G: ``−D(fake)``) or ``"bce"``
(the paper's log-loss form: D ``−log σ(D(real)) − log(1 − σ(D(fake)))``, eq. 5; G
``−log σ(D(fake))``, eq. 4).

The paper's eqs. 3–5 alone (the ``paper`` variant, ``experiments/<ds>/cgan_paper_variant.yaml``):
``adv_loss: bce``, ``wrong_label_adv: false``, ``mismatch_fake: false``, ``w_cls: 0`` and no
``binding_classifier`` — G: ``Dist + w_adv · adv_G`` on ``(G(z, y), y)``, E: ``Dist + w_kl · KL``,
D: real ``(x, y)`` against ``(G(z, y), y)``.  The defaults (``hinge``, ``wrong_label_adv``) and the
shipped configs' extra terms are MixDefense+'s.  A non-finite loss or gradient stops training with a clear error
*before* the optimizer step, so the weights (and every checkpoint written so far, ``last.ckpt``
included) stay finite: resume from the last good checkpoint.

Validation logs the mean SSIM and MSE of true-label reconstructions (from ``μ``), the KL,
and — with ``binding_classifier`` (a plain classifier file) — the *label binding*: the
share of ``G(μ, y′)`` that the classifier labels ``y′``, one random wrong label ``y′`` per
image (``mixdefense cgan evaluate`` takes all of them), and ``val/select`` = SSIM × binding,
the score a checkpoint callback keeps the best model by.  Each validation writes a Figure-8
grid (input, true-label reconstruction, six other labels) as PNG under the run folder
(``grids/step<N>.png``) and to W&B when it is a logger.

Speed (a CPU has bf16 vector units and oneDNN's channels-last kernels): ``channels_last``
stores the weights in NHWC and the trainer's ``precision: bf16-mixed`` runs the convolutions
in bfloat16; Dist, SSIM and the KL are always computed in float32, outside autocast.
Batches/s on the 2-core CPU, GTSRB CPU profile (``python benchmarks/cgan_speed.py``): see
the README.

``lr_decay``: ``[start, end]`` batches over which the three learning rates fall linearly to
``lr_final_fraction`` of their value (constant before and after); ``None`` keeps them constant.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchvision
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from lightning_modules.callbacks import ResumableRNG
from mixdefense.classifiers import load_classifier
from mixdefense.evaluation.reconstruction import figure8_grid, resize_for
from mixdefense.nets import Encoder, Generator, ProjectionDiscriminator, Reconstructor


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(N(μ, σ²) ‖ N(0, I))`` in nats (summed over latent dims)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(1).mean()


def linear_decay(batch: int, start: int, end: int, final: float) -> float:
    """1 up to ``start``, then linearly down to ``final`` at ``end``, ``final`` after."""
    progress = min(max((batch - start) / (end - start), 0.0), 1.0)
    return 1.0 - progress * (1.0 - final)


def random_wrong_labels(y: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A label ``≠ y`` for every entry, uniform over the other ``num_classes − 1`` classes."""
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=y.device)
    return (y + shift) % num_classes


class CGANModule(ResumableRNG, pl.LightningModule):
    """The revised cGAN (E, G, D) trained with Algorithm 1.  See the module docstring.

    Args:
        in_channels, image_size, num_classes: the data (images in [0, 1]).
        latent_dim: size of z.
        enc_channels, gen_channels, dis_channels: widths (see :mod:`mixdefense.nets.cgan`).
        gen_embed_dim: class embedding concatenated to z in G (0: CBN only).
        lr_g, lr_e, lr_d, beta1, beta2: Adam settings of the three optimizers.
        w_l2, w_ssim, w_kl, w_adv: loss weights.
        adv_loss: ``"hinge"`` or ``"bce"``.
        wrong_label_adv: add the adversarial term on random wrong labels.
        d_steps: discriminator updates per batch (k of Algorithm 1 applied to D).
        mismatch_fake: D also treats real images with random wrong labels as fake.
        w_cls: weight of the auxiliary-classifier (label-binding) term in G's loss; > 0 adds a
            class critic to D, trained on real images with weight 1.
        lr_cls: Adam learning rate of that critic (a group of D's optimizer).
        encoder_noise: probability of adding uniform noise ``U(−a, a)``, ``a ~ U(0, encoder_noise_max)``,
            to the encoder's input during training (the authors' robustness trick).
        binding_classifier: path of a plain classifier file for the label-binding metric.
        grid_images: number of fixed validation images in the Figure-8 grid.
        channels_last: keep the weights in channels-last (NHWC) memory format (faster conv
            kernels on CPUs; numerically the same model).
        lr_decay: ``[start, end]`` batch indices of a linear learning-rate decay (see the module
            docstring), or ``None``.
        lr_final_fraction: the learning rates' factor from ``end`` on, in (0, 1].
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 32, num_classes: int = 10, latent_dim: int = 16,
        enc_channels: tuple[int, int, int] = (32, 64, 128), gen_channels: tuple[int, int, int, int] = (128, 128, 64, 32),
        dis_channels: tuple[int, int, int, int] = (64, 64, 64, 64), gen_embed_dim: int = 0,
        lr_g: float = 2e-4, lr_e: float = 2e-4, lr_d: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999,
        w_l2: float = 1.0, w_ssim: float = 1.0, w_kl: float = 1.0, w_adv: float = 0.1, adv_loss: str = "hinge",
        wrong_label_adv: bool = True, d_steps: int = 1, mismatch_fake: bool = False, w_cls: float = 0.0,
        lr_cls: float = 1e-3, encoder_noise: float = 0.0, encoder_noise_max: float = 0.1,
        binding_classifier: str | None = None, grid_images: int = 8, channels_last: bool = False,
        lr_decay: tuple[int, int] | None = None, lr_final_fraction: float = 0.1,
    ):
        super().__init__()
        if adv_loss not in ("hinge", "bce"):
            raise ValueError(f"adv_loss must be 'hinge' or 'bce', got {adv_loss!r}")
        if d_steps < 1:
            raise ValueError(f"d_steps must be >= 1, got {d_steps}")
        if binding_classifier is not None and not Path(binding_classifier).exists():
            raise FileNotFoundError(f"binding_classifier not found: {binding_classifier} (train it with make train-classifier)")
        if lr_decay is not None and not (len(lr_decay) == 2 and 0 <= lr_decay[0] < lr_decay[1]):
            raise ValueError(f"lr_decay must be [start, end] with 0 <= start < end, got {lr_decay!r}")
        if not 0.0 < lr_final_fraction <= 1.0:
            raise ValueError(f"lr_final_fraction must be in (0, 1], got {lr_final_fraction}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.reconstructor = Reconstructor(in_channels, image_size, num_classes, latent_dim, enc_channels, gen_channels,
                                           gen_embed_dim)
        self.discriminator = ProjectionDiscriminator(in_channels, num_classes, dis_channels, aux_classifier=w_cls > 0)
        self.binder = load_classifier(binding_classifier).requires_grad_(False) if binding_classifier else None
        self._grid_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val_sums = {"ssim": 0.0, "binding": 0.0, "n": 0}

    @property
    def encoder(self) -> Encoder:
        return self.reconstructor.encoder

    @property
    def generator(self) -> Generator:
        return self.reconstructor.generator

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            # in place (param.data), before configure_optimizers: the optimizers see the same tensors
            self.reconstructor.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)

    def _float32(self):
        """A context with autocast off: losses and metrics in float32 under ``bf16-mixed``."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    # -- losses -----------------------------------------------------------------------
    def dist(self, x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``w_l2 · MSE + w_ssim · (1 − SSIM)``, in float32 whatever the autocast."""
        with self._float32():
            x_rec, x = x_rec.float(), x.float()
            return self.hparams.w_l2 * F.mse_loss(x_rec, x) + self.hparams.w_ssim * (1.0 - ssim(x_rec, x, data_range=1.0))

    def _adv_g(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.mean() if self.hparams.adv_loss == "hinge" else F.softplus(-logits).mean()

    def _adv_d(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_term = F.relu(1.0 - real).mean() if self.hparams.adv_loss == "hinge" else F.softplus(-real).mean()
        return real_term + self._adv_d_fake(fake)

    def _adv_d_fake(self, fake: torch.Tensor) -> torch.Tensor:
        """D's loss on logits it should call fake."""
        return F.relu(1.0 + fake).mean() if self.hparams.adv_loss == "hinge" else F.softplus(fake).mean()

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        p = self.hparams.encoder_noise
        if not self.training or p <= 0:
            return x
        use = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p).to(x.dtype)
        amp = torch.rand(x.shape[0], 1, 1, 1, device=x.device) * self.hparams.encoder_noise_max
        return (x + use * amp * (2 * torch.rand_like(x) - 1)).clamp(0, 1)

    def _diverged(self, what: str) -> FloatingPointError:
        """The error that stops a diverged run: where, what, and which checkpoint is left."""
        trainer = self._trainer
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") if trainer is not None else ""
        kept = f"the last good checkpoint is kept: {ckpt}" if ckpt else "the last good checkpoint (if any) is kept"
        return FloatingPointError(
            f"cGAN training diverged at step {self.global_step} (epoch {self.current_epoch}): {what}; stopped before "
            f"the optimizer step, so no non-finite weights were applied or saved; {kept}. Lower the learning "
            "rates or w_adv and resume with --ckpt_path <that checkpoint>"
        )

    def _check(self, name: str, loss: torch.Tensor) -> None:
        """Raise :meth:`_diverged` when the ``name`` network's loss is NaN or ±Inf."""
        if not torch.isfinite(loss):
            raise self._diverged(f"{name} loss is {loss.item()}")

    def _check_gradients(self, name: str, opt) -> None:
        """Raise :meth:`_diverged` when a gradient of ``opt``'s parameters is NaN or ±Inf (finite loss,
        overflowing backward pass)."""
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            raise self._diverged(f"{name} gradient is NaN or Inf (finite loss)")

    def _descend(self, opt, loss: torch.Tensor, name: str) -> None:
        """One checked gradient step of ``opt`` on ``loss``: a NaN/Inf loss or gradient stops training
        before ``opt.step()`` (see :meth:`_diverged`)."""
        self._check(name, loss)
        opt.zero_grad()
        self.manual_backward(loss)
        self._check_gradients(name, opt)
        opt.step()

    # -- Algorithm 1 ---------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_e, opt_d = self.optimizers()
        k = self.hparams.num_classes
        y_wrong = random_wrong_labels(y, k) if self.hparams.wrong_label_adv else None

        # 1. generator (encoder and discriminator frozen)
        self.toggle_optimizer(opt_g)
        with torch.no_grad():
            z = self.encoder.sample(self._encoder_input(x))[0]
        x_rec = self.generator(z, y)
        dist_g = self.dist(x_rec, x)
        adv_g, cls_g = self._g_terms(x_rec, y)
        x_wrong = self.generator(z, y_wrong) if y_wrong is not None else None
        if x_wrong is not None:
            adv_w, cls_w = self._g_terms(x_wrong, y_wrong)
            adv_g, cls_g = 0.5 * (adv_g + adv_w), 0.5 * (cls_g + cls_w)
        loss_g = dist_g + self.hparams.w_adv * adv_g + self.hparams.w_cls * cls_g
        self._descend(opt_g, loss_g, "generator")
        self.untoggle_optimizer(opt_g)

        # 2. encoder (generator and discriminator frozen)
        self.toggle_optimizer(opt_e)
        z, mu, logvar = self.encoder.sample(self._encoder_input(x))
        dist_e = self.dist(self.generator(z, y), x)
        with self._float32():
            kl = kl_to_standard_normal(mu.float(), logvar.float())
        loss_e = dist_e + self.hparams.w_kl * kl
        self._descend(opt_e, loss_e, "encoder")
        self.untoggle_optimizer(opt_e)

        # 3. discriminator, on the fakes of step 1 (drawn before G's update, as in most GAN
        # code: a second generator pass per batch would cost ~13 % of the step on a CPU)
        fake = x_rec.detach()
        fake_wrong = x_wrong.detach() if x_wrong is not None else None
        self.toggle_optimizer(opt_d)
        for _ in range(self.hparams.d_steps):
            h_real = self.discriminator.features(x)
            real = self.discriminator.score_features(h_real, y)
            loss_d = self._adv_d(real, self.discriminator(fake, y))
            if fake_wrong is not None:
                loss_d = 0.5 * (loss_d + self._adv_d(real, self.discriminator(fake_wrong, y_wrong)))
            if self.hparams.mismatch_fake:
                mismatched = self.discriminator.score_features(h_real, random_wrong_labels(y, k))
                loss_d = loss_d + self._adv_d_fake(mismatched)
            real_cls = self.discriminator.classifier(x) if self.discriminator.classifier is not None else None
            if real_cls is not None:
                loss_d = loss_d + F.cross_entropy(real_cls, y)
            self._descend(opt_d, loss_d, "discriminator")
        self.untoggle_optimizer(opt_d)
        for scheduler in self._schedulers():
            scheduler.step()

        logs = {"train/loss_g": loss_g.detach(), "train/loss_e": loss_e.detach(), "train/loss_d": loss_d.detach(),
                "train/dist": dist_e.detach(), "train/kl": kl.detach()}
        if real_cls is not None:
            logs["train/cls_g"] = cls_g.detach()
        self.log_dict(logs, prog_bar=True, on_step=True, on_epoch=True)

    def _g_terms(self, fake: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """G's adversarial term on ``(fake, y)`` and its class-head cross-entropy toward ``y`` (0 without the head)."""
        score, cls = self.discriminator.score_and_classify(fake, y)
        ce = F.cross_entropy(cls, y) if cls is not None else score.new_zeros(())
        return self._adv_g(score), ce

    # -- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction ``G(μ(x), y)`` in [0, 1]."""
        return self.generator(self.encoder(x)[0], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0 and self._grid_batch is None:
            n = self.hparams.grid_images
            self._grid_batch = (x[:n].detach().clone(), y[:n].detach().clone())
        mu, logvar = self.encoder(x)
        x_rec = self.generator(mu, y)
        with self._float32():
            x_rec, x, mu, logvar = x_rec.float(), x.float(), mu.float(), logvar.float()
            val_ssim = ssim(x_rec, x, data_range=1.0)
            self.log("val/mse", F.mse_loss(x_rec, x), sync_dist=True)
            self.log("val/kl", kl_to_standard_normal(mu, logvar), sync_dist=True)
        self._val_sums["ssim"] += float(val_ssim) * x.shape[0]
        self._val_sums["n"] += x.shape[0]
        self.log("val/ssim", val_ssim, prog_bar=True, sync_dist=True)
        if self.binder is not None:
            y_wrong = random_wrong_labels(y, self.hparams.num_classes, torch.Generator(device=y.device).manual_seed(batch_idx))
            x_wrong = resize_for(self.binder, self.generator(mu, y_wrong))  # e.g. 32×32 MNIST for a 28×28 LeNet
            pred = self.binder.to(x.device).eval()(x_wrong).argmax(1)
            self._val_sums["binding"] += float((pred == y_wrong).sum())
            self.log("val/binding", (pred == y_wrong).float().mean(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_start(self):
        self._val_sums = {"ssim": 0.0, "binding": 0.0, "n": 0}

    def on_validation_epoch_end(self):
        # model selection on validation data: faithful *and* label-bound (a GAN's last step is
        # not always its best: the MNIST CPU run fell from 0.885 SSIM / 0.971 binding to
        # 0.787 / 0.812 between its last two validations)
        n = max(self._val_sums["n"], 1)
        if self.binder is not None:
            select = (self._val_sums["ssim"] / n) * (self._val_sums["binding"] / n)
            self.log("val/select", torch.tensor(select, device=self.device), sync_dist=True)
        if self._grid_batch is None or self.trainer.sanity_checking:
            return
        grid = self.figure8_grid(*self._grid_batch)
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "grids"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step{self.global_step:07d}.png"
        torchvision.utils.save_image(grid, path)
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("val/figure8", [str(path)], step=self.global_step)

    def figure8_grid(self, x: torch.Tensor, y: torch.Tensor, other: int = 6) -> torch.Tensor:
        """Rows: input, reconstruction with the true label, then with ``other`` other labels."""
        return figure8_grid(self.reconstructor, x, y, self.hparams.num_classes, other)

    def _discriminator_groups(self) -> list[dict]:
        """D's parameters; the class critic (when there is one) in its own group at ``lr_cls``."""
        critic = self.discriminator.classifier
        if critic is None:
            return [{"params": list(self.discriminator.parameters())}]
        ids = {id(p) for p in critic.parameters()}
        return [{"params": [p for p in self.discriminator.parameters() if id(p) not in ids]},
                {"params": list(critic.parameters()), "lr": self.hparams.lr_cls}]

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return schedulers if isinstance(schedulers, list) else [schedulers]

    def configure_optimizers(self):
        betas = (self.hparams.beta1, self.hparams.beta2)
        optimizers = [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr_g, betas=betas),
            torch.optim.Adam(self.encoder.parameters(), lr=self.hparams.lr_e, betas=betas),
            torch.optim.Adam(self._discriminator_groups(), lr=self.hparams.lr_d, betas=betas),
        ]
        if self.hparams.lr_decay is None:
            return optimizers
        # stepped once per batch by training_step (manual optimisation); saved and restored with the checkpoint
        factor = functools.partial(linear_decay, start=self.hparams.lr_decay[0], end=self.hparams.lr_decay[1],
                                   final=self.hparams.lr_final_fraction)
        return optimizers, [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers]

"""The small base class every pretraining method shares."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ssl_kit.checkpoints.format import METADATA_KEY, encoder_record
from ssl_kit.views import EvalTransform

OptimizerCallable = Callable[[Iterable], Optimizer]

#: Parameter names that never get weight decay, beyond every 0-/1-D tensor (biases, norms, GRN).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


def adamw(params: Iterable) -> Optimizer:
    """MAE/FCMAE's AdamW: base lr 1.5e-4 per 256 images, betas (0.9, 0.95), weight decay 0.05."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def weight_decay_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    Biases, norm/GRN parameters (every tensor with ``ndim <= 1``), position embeddings and
    special tokens are not decayed; frozen parameters are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        ndim = getattr(p, "orig_ndim", p.ndim)  # FSDP flattens shards to 1-D; SpeedUp records the true ndim
        if ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from 0, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class SSLMethod(pl.LightningModule):
    """Shared machinery: optimizer injection, weight-decay groups, lr scaling, warm-up + cosine.

    The method contract (``tests/test_methods.py`` checks it for every method of the test zoo;
    ``docs/adding_a_method.md`` walks through it):

    * ``encoder`` is a timm model with ``num_classes=0`` and ``encoder_spec`` its (timm name,
      create kwargs); :meth:`extract_features` maps (B, C, H, W) to (B, D), D =
      ``encoder.num_features``, and ``export`` then ``load_encoder`` reproduce it exactly.
    * :meth:`train_transform` maps one image to a **list** of views (``Views`` for one view);
      ``training_step`` receives ``(views, labels)``; :meth:`example_batch` is derived from it.
    * The class declares ``fp16_safe`` (False when the loss regresses pixels).
    * Every random draw of a training step comes from the step generator: per-sample draws
      through :meth:`draw_global`, draws every rank needs whole from :meth:`step_generator`;
      never from the global RNG. N processes with batch b then draw what one process with
      batch N x b draws, and a resumed run draws like an uninterrupted one.
    * Frozen sub-modules rebuilt from their own source stay out of checkpoints
      (``ssl_kit.checkpoints.strip_frozen`` / ``restore_frozen``); ``checkpoint["ssl_kit"]`` is
      extended, never replaced.

    Args:
        optimizer: builds the optimizer from parameter groups. With ``lr_scaling`` its ``lr`` is
            the base lr for a global batch of 256.
        lr_scaling: apply ``lr = base_lr * global_batch / 256`` (global batch = per-device batch
            x devices x nodes x gradient accumulation).
        warmup_epochs: linear warm-up length, in (possibly fractional) epochs.
        min_lr_ratio: final lr of the cosine schedule as a fraction of the peak lr.
    """

    encoder: nn.Module
    encoder_spec: tuple[str, dict[str, Any]]
    img_size: int
    #: False for methods that regress raw pixels (MAE-style): fp16 overflows there, use bf16.
    fp16_safe: bool = True

    def __init__(
        self,
        optimizer: OptimizerCallable = adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        self.optimizer_fn = optimizer
        self.lr_scaling = lr_scaling
        self.warmup_epochs = warmup_epochs
        self.min_lr_ratio = min_lr_ratio

    # --- contract -------------------------------------------------------------------------
    def extract_features(self, x: Tensor) -> Tensor:
        """Map images to one feature vector each, as evaluators use it.

        Shapes:
            x: (B, C, H, W) -> (B, D)
        """
        return self.encoder(x)

    def train_transform(self) -> Callable:
        """The per-image training view(s) transform; the data module asks the model for it."""
        raise NotImplementedError

    def eval_transform(self) -> Callable:
        """Deterministic transform for feature extraction (resize, centre crop, normalise)."""
        return EvalTransform(self.img_size)

    def build_encoder(self) -> nn.Module:
        """A freshly initialised encoder of the same architecture (used for random-init baselines)."""
        raise NotImplementedError

    def example_batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[Any, Tensor]:
        """A synthetic training batch shaped like the data module's, built on ``device``.

        Derived from :meth:`train_transform`: the transform is applied to one blank image and
        every view it returns becomes a random (B, C, H, W) tensor of that view's shape, so any
        method that declares its views gets a correct batch (``bench`` times training steps on
        it, so the data pipeline is never the bottleneck).

        Shapes:
            returns (views: a list of (B, C, H_v, W_v), one per view, or one (B, C, H, W) tensor
            for single-view transforms; labels (B,))
        """
        views = self.train_transform()(Image.new("RGB", (self.img_size, self.img_size), (128, 128, 128)))

        def batch_of(view: Tensor) -> Tensor:
            return torch.randn(batch_size, *view.shape, device=device)  # (B, C, H_v, W_v)

        batch = [batch_of(v) for v in views] if isinstance(views, (list, tuple)) else batch_of(views)
        return batch, torch.zeros(batch_size, dtype=torch.long, device=device)

    # --- optimisation ---------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Per-device batch x world size x gradient accumulation, as the trainer will run it."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            per_device = trainer.fit_loop._data_source.dataloader().batch_size
        return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; methods override to exclude or add modules."""
        return weight_decay_groups(self)

    def configure_optimizers(self):
        optimizer = self.optimizer_fn(self.param_groups())
        global_batch = self.global_batch_size()
        scale = global_batch / 256 if self.lr_scaling else 1.0
        for group in optimizer.param_groups:
            group["lr"] *= scale
        peak_lr = optimizer.param_groups[0]["lr"]
        if self.trainer.is_global_zero:  # not self.print: it writes to a progress bar that does not exist yet
            print(f"global batch {global_batch} -> lr {peak_lr:.3g} (scaling x{scale:.4g})", flush=True)
        self.hparams_extra = {"global_batch_size": global_batch, "peak_lr": peak_lr}

        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = total / max_epochs if max_epochs and max_epochs > 0 else total
        warmup = min(total, int(round(self.warmup_epochs * steps_per_epoch)))
        schedule = LambdaLR(optimizer, lambda s: warmup_cosine(s, warmup, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- reproducible randomness -----------------------------------------------------------
    def step_generator(self, device: torch.device | str) -> torch.Generator:
        """An RNG seeded by (run seed, optimizer step, micro-batch) for this training batch.

        It is the same on every rank and independent of RNG history, so a method that draws
        its per-sample randomness (e.g. masks) for the *global* batch from it and keeps its own
        rank's rows gets the same draws at any world size and after an exact resume.
        """
        trainer = self.trainer
        micro = trainer.fit_loop.epoch_loop.batch_idx % max(1, trainer.accumulate_grad_batches)
        g = torch.Generator(device=device)
        g.manual_seed(hash((self.run_seed, trainer.global_step, micro)) & (2**63 - 1))
        return g

    def draw_global(self, draw: Callable[..., Any], batch_size: int, device: torch.device | str) -> Any:
        """Per-sample randomness of a training step, drawn for the *global* batch, this rank's rows kept.

        ``draw(n, generator)`` returns a tensor (or a tuple of tensors) with one row per sample.
        In a training step it is called with the global batch size and :meth:`step_generator`, and
        this rank's ``batch_size`` rows are returned: N processes with batch b draw exactly what one
        process with batch N x b draws, and a resumed run draws like an uninterrupted one. Outside
        a training step (inference, reconstructions, tests without a trainer) the global RNG is used.

        Shapes:
            draw(n, g) -> (n, ...) or a tuple of them; returns (batch_size, ...) likewise.
        """
        if not self.training or self._trainer is None:
            return draw(batch_size, None)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        drawn = draw(world * batch_size, self.step_generator(device))
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        return tuple(t[rows] for t in drawn) if isinstance(drawn, tuple) else drawn[rows]

    @property
    def run_seed(self) -> int:
        """The seed the run started with; kept in checkpoints so a resumed run draws as the original."""
        if getattr(self, "_run_seed", None) is None:
            self._run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        return self._run_seed

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lets `export` and `load_encoder` rebuild the encoder without instantiating the method.
        name, kwargs = self.encoder_spec
        checkpoint[METADATA_KEY] = encoder_record(type(self).__name__, name, kwargs, run_seed=self.run_seed)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._run_seed = checkpoint.get(METADATA_KEY, {}).get("run_seed")

    def on_train_start(self) -> None:
        extra = getattr(self, "hparams_extra", None)
        if extra and self.logger is not None:
            self.logger.log_hyperparams(extra)

    def log_step(self, loss: Tensor, batch_size: int, **extra: Tensor) -> None:
        """Log the loss, the current lr and any extra scalars for this training step."""
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        for name, value in extra.items():
            self.log(f"train/{name}", value, batch_size=batch_size)

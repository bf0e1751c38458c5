"""The small training base shared by pretraining methods and trained evaluators: optimizer
injection, one weight-decay rule, the lr scaling rule and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import pytorch_lightning as pl
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

OptimizerCallable = Callable[[Iterable], Optimizer]

#: Parameter names that never get weight decay, beyond every 0-/1-D tensor (biases, norms, GRN)
#: and what a timm module lists in its ``no_weight_decay()``.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")

#: Name segments that wrappers insert (FSDP, activation checkpointing, torch.compile).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def adamw(params: Iterable) -> Optimizer:
    """MAE/FCMAE's AdamW: base lr 1.5e-4 per 256 images, betas (0.9, 0.95), weight decay 0.05."""
    return torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)


def plain_name(name: str) -> str:
    """A parameter's name without the segments wrappers insert (as in the unwrapped module)."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters that timm modules inside ``module`` exclude from weight decay
    (their ``no_weight_decay()``, relative to themselves)."""
    names = set()
    for prefix, sub in module.named_modules():
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            names |= {plain_name(f"{prefix}.{n}" if prefix else n) for n in listed()}
    return names


def weight_decay_groups(module: nn.Module, ndims: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group: the rule.

    Not decayed: every tensor with ``ndim <= 1`` (biases, norm and GRN parameters), position
    embeddings and special tokens (:data:`NO_DECAY_NAMES`), and what timm modules list in
    ``no_weight_decay()``. Frozen parameters are left out.

    Args:
        module: the module whose parameters are grouped.
        ndims: each parameter's true ``ndim`` by plain name, recorded before a strategy wrapped the
            module (FSDP turns parameters into 1-D shards); None: the parameters' own.
    """
    excluded = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        name = plain_name(name)
        ndim = (ndims or {}).get(name, p.ndim)
        if ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or name in excluded:
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


class TrainingModule(pl.LightningModule):
    """Optimizer injection, weight-decay groups, the lr scaling rule, warm-up + cosine.

    The base of pretraining methods (:class:`~ssl_kit.methods.SSLMethod`) and of the trained
    evaluators (linear probe, fine-tuning).

    Args:
        optimizer: builds the optimizer from parameter groups. With ``lr_scaling`` its ``lr`` is
            the base lr for a global batch of 256.
        lr_scaling: apply ``lr = base_lr * global_batch / 256`` (global batch = per-device batch
            x devices x nodes x gradient accumulation).
        warmup_epochs: linear warm-up length, in (possibly fractional) epochs.
        min_lr_ratio: final lr of the cosine schedule as a fraction of the peak lr.
    """

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
        self.param_ndims: dict[str, int] | None = None

    def configure_model(self) -> None:
        # Lightning calls this before the strategy wraps the model (FSDP flattens parameters).
        self.param_ndims = {plain_name(n): p.ndim for n, p in self.named_parameters()}

    def global_batch_size(self) -> int:
        """Per-device batch x world size x gradient accumulation, as the trainer will run it."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None)
        if per_device is None:
            per_device = trainer.fit_loop._data_source.dataloader().batch_size
        return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer; subclasses override to exclude or add modules."""
        return weight_decay_groups(self, self.param_ndims)

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

    def on_train_start(self) -> None:
        extra = getattr(self, "hparams_extra", None)
        if extra and self.logger is not None:
            self.logger.log_hyperparams(extra)

    def log_step(self, loss: torch.Tensor, batch_size: int, **extra: torch.Tensor) -> None:
        """Log the loss, the current lr and any extra scalars for this training step."""
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        for name, value in extra.items():
            self.log(f"train/{name}", value, batch_size=batch_size)

"""Skip optimizer steps whose loss or gradients are not finite, and stop after too many in a row."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from ssl_kit.errors import UserError


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive`` skipped steps in a row."""


class NaNGuard(Callback):
    """Keeps a NaN/Inf loss (or gradient) from ever reaching the weights.

    After backward, a step whose loss or gradients hold NaN/Inf is skipped: the gradients are
    dropped so the optimizer leaves every parameter and its state untouched (the lr schedule
    still advances). Each skip is warned about with its global step and logged as
    ``train/skipped_steps``. After ``max_consecutive`` skipped steps in a row training stops with
    :class:`NonFiniteLossError` naming the step and the last checkpoint. Under DDP the decision
    is reduced over ranks (any rank bad -> all skip), so ranks agree and nothing hangs. Works
    for any LightningModule using automatic optimisation.

    Args:
        max_consecutive: consecutive skipped steps that stop training (>= 1).
        check_grads: also skip when the loss is finite but a gradient is not.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[NaNGuard(max_consecutive=5)])
    """

    def __init__(self, max_consecutive: int = 10, check_grads: bool = True) -> None:
        if max_consecutive < 1:
            raise UserError(f"max_consecutive={max_consecutive} is not allowed: it must be >= 1.")
        self.max_consecutive, self.check_grads = max_consecutive, check_grads
        self.consecutive = 0
        self.skipped = 0
        self._bad_loss: Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad  # OR over accumulated batches

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = self._bad_loss if self._bad_loss is not None else torch.zeros((), dtype=torch.bool)
        self._bad_loss = None
        if self.check_grads and params:
            norms = torch._foreach_norm([p.grad for p in params])
            bad = bad.to(norms[0].device) | ~torch.isfinite(torch.stack(norms).sum())
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self.consecutive = 0
            return
        self._skip(trainer, optimizer, params)
        self.consecutive += 1
        self.skipped += 1
        step = trainer.global_step
        pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
        rank_zero_warn(f"NaNGuard: non-finite loss or gradient at global step {step}: step skipped, weights "
                       f"unchanged ({self.consecutive} in a row, {self.skipped} in total).")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"NaNGuard: {self.consecutive} consecutive non-finite steps, the last at global step {step}; "
                f"stopping (the weights were not updated by these steps). Last checkpoint: {_last_checkpoint(trainer)}."
            )

    @staticmethod
    def _skip(trainer: pl.Trainer, optimizer, params: list) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            for p in params:  # fp16 GradScaler: make it see inf, so it skips the step and backs off
                p.grad.fill_(float("nan"))
        else:
            optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves the parameter alone

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))


def _last_checkpoint(trainer: pl.Trainer) -> str:
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            return f"{path} (resume with --ckpt_path last, after fixing the cause: lower lr, bf16/fp32, data)"
    return "none saved yet"

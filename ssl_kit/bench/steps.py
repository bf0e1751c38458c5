"""Real training steps for the benchmarks: a Lightning ``Trainer`` fit of a method on its example
batch, made on the device once and repeated, so the data pipeline is never the bottleneck.

Every benchmark that times a method goes through :func:`fit_steps`: what it times is the method's
own ``training_step``, backward and the optimizer of its ``configure_optimizers`` (with hooks such
as ReLICv2's EMA update in ``optimizer_step``), never a copy of them.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from ssl_kit.bench.timer import StepTimer
from ssl_kit.callbacks.speed import auto_precision
from ssl_kit.methods import SSLMethod


class RepeatedBatch:
    """An iterable yielding the same on-device batch ``n`` times (``batch_size`` for lr scaling)."""

    def __init__(self, batch: Any, n: int, batch_size: int) -> None:
        self.batch, self.n, self.batch_size = batch, n, batch_size

    def __iter__(self):
        return itertools.repeat(self.batch, self.n)

    def __len__(self) -> int:
        return self.n


def fit_steps(model: SSLMethod, batch: Any, batch_size: int, steps: int, device: torch.device, precision: str,
              callbacks: Sequence[pl.Callback]) -> None:
    """Run ``steps`` Lightning training steps of ``model`` on ``batch`` on one device, nothing logged or saved."""
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_epochs=1, max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
    )
    trainer.fit(model, train_dataloaders=RepeatedBatch(batch, steps, batch_size))


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise the device named."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def step_precision(device: torch.device, precision: str | None = None) -> str:
    """``precision`` if given; else bf16 mixed precision on a CUDA GPU that has it, fp32 on a CPU
    (the per-method benchmarks' CPU figures are fp32, also where the CPU has native bf16)."""
    if precision:
        return precision
    return auto_precision("cuda") if device.type == "cuda" else "32-true"


def timed_steps(model: SSLMethod, batch_size: int, steps: int, warmup_steps: int, device: torch.device,
                precision: str, callbacks: Sequence[pl.Callback] = ()) -> StepTimer:
    """Fit ``warmup_steps + steps`` steps on the model's example batch; the timer of the last ``steps``.

    ``callbacks`` run after the timer in each hook: their work at a step's start is inside its time,
    at its end outside it.
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the figures readable
    model.to(device)
    timer = StepTimer(warmup_steps, device)
    fit_steps(model, model.example_batch(batch_size, device), batch_size, warmup_steps + steps, device, precision,
              [timer, *callbacks])
    return timer

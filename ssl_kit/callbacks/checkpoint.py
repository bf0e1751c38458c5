"""Checkpointing into the run directory: ``last.ckpt`` every epoch, numbered ones periodically."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps every periodic checkpoint (``epoch=NNNN.ckpt`` each
    ``every_n_epochs``) and refreshes ``last.ckpt`` at the end of every epoch, so a preempted
    run loses at most one epoch.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        filename: str = "epoch={epoch:04d}",
        save_last: bool = True,
        save_top_k: int = -1,
        auto_insert_metric_name: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(
            dirpath=dirpath, every_n_epochs=every_n_epochs, filename=filename, save_last=save_last,
            save_top_k=save_top_k, auto_insert_metric_name=auto_insert_metric_name, **kwargs,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run that stops mid-epoch (max_steps, time limit) still leaves its final state in last.ckpt.
        if self.save_last and self._last_global_step_saved != trainer.global_step and trainer.state.fn == "fit":
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

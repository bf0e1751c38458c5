"""Checkpointing into the run directory, built to survive preemption and crashes.

``RunCheckpoint`` writes ``last.ckpt`` every epoch (and every ``every_n_train_steps``), numbered
``epoch=NNNN.ckpt`` periodically, stores the process RNG states so a resumed run continues
exactly, saves ``last.ckpt`` and exits on SIGTERM / SIGUSR1, and installs
:class:`SafeCheckpointIO` (atomic writes, ``weights_only=True`` reads) on the trainer.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssl_kit.callbacks.rng_state import capture_rng_state, restore_rng_state
from ssl_kit.export import load_checkpoint

#: Signals that make a run save ``last.ckpt`` at the end of the current step and exit.
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
RNG_KEY = "rng_states"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``.

    A process killed at any moment leaves either the previous file or the complete new one at
    ``path``, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically and only ever reads with ``weights_only=True``.

    A checkpoint that needs arbitrary unpickling (e.g. one carrying a code payload) is refused
    with an error naming the file; there is no unsafe fallback, whatever ``weights_only`` the
    caller asks for.

    Examples:
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()])  # RunCheckpoint installs it itself
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(path):  # object stores: their put is already all-or-nothing
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for resumable runs.

    Keeps every periodic checkpoint (``epoch=NNNN.ckpt`` each ``every_n_epochs``), refreshes
    ``last.ckpt`` at the end of every epoch and every ``every_n_train_steps`` optimizer steps, and
    on SIGTERM or SIGUSR1 writes ``last.ckpt`` at the end of the current step and exits with code
    ``128 + signal``. Checkpoints carry the RNG states, restored when training restarts.

    Args:
        dirpath: the run directory.
        every_n_epochs: period of the numbered checkpoints.
        every_n_train_steps: refresh ``last.ckpt`` this often mid-epoch (0: only at epoch ends).
        **kwargs: passed to ``ModelCheckpoint``.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[RunCheckpoint("runs/x", every_n_train_steps=500)])
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int = 1,
        every_n_train_steps: int = 0,
        filename: str = "epoch={epoch:04d}",
        save_top_k: int = -1,
        save_last: bool = True,
        auto_insert_metric_name: bool = False,
        **kwargs,
    ) -> None:
        # The defaults are explicit arguments (not kwargs.setdefault) so that LightningCLI, which
        # passes every ModelCheckpoint argument, keeps them.
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} is not allowed: use 0 (off) or a positive step count.")
        super().__init__(dirpath=dirpath, filename=filename, every_n_epochs=every_n_epochs, save_top_k=save_top_k,
                         save_last=save_last, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.last_every_n_train_steps = every_n_train_steps
        self._pending_rng: dict | None = None
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saves = 0

    # --- safe IO and RNG states ----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # leave a user's own IO alone
            trainer.strategy.checkpoint_io = SafeCheckpointIO()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = capture_rng_state(pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get(RNG_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # As late as possible, so the RNG continues exactly where the interrupted run stopped.
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng, pl_module)
            self._pending_rng = None
        self._install_signal_handlers()

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saves += 1

    # --- when to write last.ckpt ---------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._exit_if_preempted(trainer)
        n = self.last_every_n_train_steps
        if n and trainer.global_step % n == 0 and not self._should_skip_saving_checkpoint(trainer):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saves = self._saves
        super().on_train_epoch_end(trainer, pl_module)
        # Also when this step was already saved mid-epoch: an epoch-end checkpoint resumes cleanly
        # at the next epoch, after this epoch's end hooks.
        if self._saves == saves and self.save_last and not self._should_skip_saving_checkpoint(trainer, same_step=True):
            self._save_last(trainer)
        self._exit_if_preempted(trainer)  # before Lightning's own SIGTERM exit (code 0, no checkpoint)

    def _should_skip_saving_checkpoint(self, trainer: pl.Trainer, same_step: bool = False) -> bool:
        if same_step and self._last_global_step_saved == trainer.global_step:
            saved, self._last_global_step_saved = self._last_global_step_saved, -1
            skip = super()._should_skip_saving_checkpoint(trainer)
            self._last_global_step_saved = saved
            return skip
        return super()._should_skip_saving_checkpoint(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # --- preemption ----------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in PREEMPTION_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signum not in self._previous_handlers:
                self._previous_handlers[signum] = signal.getsignal(signum)
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        # Only note it: the save happens at the end of the step, where the state is consistent.
        self._signal = signum
        previous = self._previous_handlers.get(signum)
        if callable(previous):  # Lightning's handlers (SLURM requeue, DDP SIGTERM broadcast)
            previous(signum, frame)

    def _exit_if_preempted(self, trainer: pl.Trainer) -> None:
        if not self._preemption_requested(trainer):
            return
        self._save_last(trainer)
        rank_zero_info(f"preemption signal {self._signal}: saved {self.last_model_path} at global step "
                       f"{trainer.global_step}; resume with --ckpt_path last")
        raise SystemExit(128 + self._signal)

    def _preemption_requested(self, trainer: pl.Trainer) -> bool:
        requested = self._signal is not None
        if trainer.world_size > 1:  # every rank must save and leave together
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
            if requested and self._signal is None:
                self._signal = signal.SIGTERM
        return requested

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run that stops mid-epoch (max_steps, time limit) still leaves its final state in last.ckpt.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last(trainer)

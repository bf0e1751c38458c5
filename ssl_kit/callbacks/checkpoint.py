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

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssl_kit.callbacks.rng_state import capture_rng_state, restore_rng_state
from ssl_kit.checkpoints import atomic_torch_save, load_checkpoint
from ssl_kit.checkpoints.integrity import seal
from ssl_kit.errors import UserError

#: Signals that make a run save ``last.ckpt`` at the end of the current step and exit.
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
RNG_KEY = "rng_states"


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically with per-tensor checksums and only ever
    reads with ``weights_only=True``, verifying those checksums.

    A checkpoint that needs arbitrary unpickling (e.g. one carrying a code payload) is refused
    with an error naming the file; there is no unsafe fallback, whatever ``weights_only`` the
    caller asks for. A truncated or corrupted file, or one with non-finite weights, is refused
    naming the file and the newest good checkpoint beside it.

    Examples:
        >>> trainer = pl.Trainer(plugins=[SafeCheckpointIO()])  # RunCheckpoint installs it itself
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        checkpoint = seal(checkpoint)  # per-tensor checksums, verified by every load
        if not _is_local_file_protocol(path):  # object stores: their put is already all-or-nothing
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for resumable runs.

    Keeps every periodic checkpoint (``epoch=NNNN.ckpt`` each ``every_n_epochs``, written once and
    never replaced), refreshes ``last.ckpt`` at the end of every epoch and every
    ``every_n_train_steps`` optimizer steps, and on SIGTERM or SIGUSR1 writes ``last.ckpt`` at the
    end of the current step and exits with code ``128 + signal``. Checkpoints carry the RNG
    states, restored when training restarts. ``last.ckpt`` is always the one in ``dirpath``, also
    after the run directory was moved or copied (never ``last-v1.ckpt``).

    Args:
        dirpath: the run directory.
        every_n_epochs: period of the numbered checkpoints.
        every_n_train_steps: refresh ``last.ckpt`` this often mid-epoch (0: only at epoch ends).
        enable_version_counter: must stay False: a run directory never holds ``-vN`` copies.
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
        enable_version_counter: bool = False,
        **kwargs,
    ) -> None:
        # The defaults are explicit arguments (not kwargs.setdefault) so that LightningCLI, which
        # passes every ModelCheckpoint argument, keeps them.
        if every_n_train_steps < 0:
            raise UserError(f"every_n_train_steps={every_n_train_steps} is not allowed: use 0 (off) or a positive step count.")
        if enable_version_counter:
            raise UserError("checkpoint.enable_version_counter=true is not allowed: last.ckpt is updated in place "
                            "and numbered checkpoints are written once, so no -vN copies are needed.")
        super().__init__(dirpath=dirpath, filename=filename, every_n_epochs=every_n_epochs, save_top_k=save_top_k,
                         save_last=save_last, auto_insert_metric_name=auto_insert_metric_name,
                         enable_version_counter=False, **kwargs)
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
        if filepath != self._last_path() and self.file_exists(filepath, trainer):
            # A resumed run reaching an epoch again: the numbered file already holds it.
            rank_zero_info(f"{filepath} exists: kept as written (numbered checkpoints are written once)")
            return
        super()._save_checkpoint(trainer, filepath)
        self._saves += 1

    def _last_path(self) -> str:
        return os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state with its paths moved into this run's ``dirpath``.

        Lightning restores ``last_model_path`` only when the stored absolute ``dirpath`` equals
        the current one; otherwise its next save goes to ``last-v1.ckpt`` and ``last.ckpt`` stays
        behind. A run directory that was moved, copied or mounted elsewhere (container vs host,
        cluster scratch) must keep writing ``last.ckpt`` where it now lives.
        """
        if self.dirpath is None:
            return super().load_state_dict(state_dict)
        here = Path(self.dirpath)
        rebase = lambda p: str(here / Path(p).name) if p else p  # noqa: E731
        super().load_state_dict({
            **state_dict, "dirpath": self.dirpath, "last_model_path": self._last_path(),
            "best_model_path": rebase(state_dict.get("best_model_path", "")),
            "kth_best_model_path": rebase(state_dict.get("kth_best_model_path", "")),
            "best_k_models": {rebase(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
        })

    # --- when to write last.ckpt ---------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if batch_idx + 1 >= trainer.num_training_batches:
            # The epoch's last batch: on_train_epoch_end saves (and exits on a signal) moments later.
            # A checkpoint from between the two resumes through Lightning's "restarted at the end of
            # an epoch" path, whose epoch counters are off by one afterwards (a later mid-epoch
            # resume then trains a batch twice). Lightning too defers its SIGTERM exit to then.
            return
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

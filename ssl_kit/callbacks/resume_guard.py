"""Refuse to resume a checkpoint under a different batch size, world size, accumulation or dataset.

The data position a checkpoint stores is "epoch e, b batches of this rank done"; it means the
same samples only under the batch size, world size and dataset it was written with (and the
optimizer-step count means the same only under the same accumulation). :class:`ResumeGuard`
records those four in every checkpoint and compares them on resume.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from ssl_kit.errors import ResumeMismatchError

RECORD_KEY = "ssl_kit_resume"
#: Loop counters of the training epoch that count this rank's batches.
BATCH_PROGRESS = "epoch_loop.batch_progress"


class ResumeGuard(pl.Callback):
    """Stores (per-device batch size, world size, gradient accumulation, training-set length) in
    each checkpoint; resuming with any of them changed is an error naming what changed.

    With ``allow_changes`` the run continues instead, from the same *sample* position: the
    ``b`` batches of ``B`` images on ``W`` ranks already trained in the interrupted epoch become
    ``floor(b * B * W / (B' * W'))`` batches under the new setting (at most one batch of images
    is seen twice, none is skipped); the data order, and so the result, then differ from an
    uninterrupted run, and the optimizer keeps the checkpoint's learning rate.

    Args:
        allow_changes: continue from the same sample position instead of refusing.

    Examples:
        >>> # python -m ssl_kit fit ... --ckpt_path last --resume.allow_changes true
        >>> trainer = pl.Trainer(callbacks=[ResumeGuard(allow_changes=True)])
    """

    def __init__(self, allow_changes: bool = False) -> None:
        self.allow_changes = allow_changes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = current_setting(trainer)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved, now = checkpoint.get(RECORD_KEY), current_setting(trainer)
        if saved is None or trainer.state.fn != "fit":  # a checkpoint from before the guard
            return
        changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}
        if not changed:
            return
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if not self.allow_changes:
            raise ResumeMismatchError(
                f"cannot resume exactly: {what} since the checkpoint was written. Resume with the original values, "
                f"or pass --resume.allow_changes true to continue from the same sample position.")
        batches = rescale_position(trainer, checkpoint, saved, now)
        rank_zero_info(f"resuming with {what} (--resume.allow_changes): the interrupted epoch continues after "
                       f"{batches} batch(es) of the new size, the same images seen so far")


def current_setting(trainer: pl.Trainer) -> dict[str, int]:
    """The values a checkpoint's data position depends on, as this trainer will run."""
    dm = trainer.datamodule
    setting = {"world_size": trainer.world_size, "accumulate_grad_batches": trainer.accumulate_grad_batches}
    if dm is not None and hasattr(dm, "batch_size"):
        setting["batch_size"] = int(dm.batch_size)
    if dm is not None and hasattr(dm, "split"):
        setting["train_samples"] = len(dm.split("train", None))
    return setting


def rescale_position(trainer: pl.Trainer, checkpoint: dict[str, Any], saved: dict[str, int],
                     now: dict[str, int]) -> int:
    """Turn the stored ``batches done in this epoch`` into the same number of samples under ``now``:
    the data module gets the new position and the epoch loop's counters in ``checkpoint`` (restored
    after this hook) are rewritten to match. Returns the new batch count."""
    dm = trainer.datamodule
    data = checkpoint.get(type(dm).__qualname__) if dm is not None else None
    if not isinstance(data, dict) or "sampler_batches_done" not in data:
        return 0
    samples = data["sampler_batches_done"] * saved.get("batch_size", 1) * saved["world_size"]
    per_step = now.get("batch_size", 1) * now["world_size"]
    per_epoch = now.get("train_samples", samples) // per_step  # batches of one rank in a full epoch
    batches = min(samples // per_step, per_epoch)
    shift, data["sampler_batches_done"] = batches - data["sampler_batches_done"], batches
    dm.load_state_dict(data)  # the data module read the old position before callbacks are restored
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get(BATCH_PROGRESS)
    if progress is not None:  # shifted alike: Lightning's restart logic reads their differences
        progress["current"].update({k: max(0, v + shift) for k, v in progress["current"].items()})
    return batches

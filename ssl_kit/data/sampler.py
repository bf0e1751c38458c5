"""A training sampler whose order is a pure function of (seed, epoch), so a run resumes mid-epoch exactly.

Lightning restores its loop counters on resume but restarts the data loader from the first batch
of the epoch. :class:`ResumableSampler` reads the restored counters from the trainer when an
epoch's iterator is created and skips the batches the interrupted run already trained on. Each
index travels with its own augmentation seed (see :func:`sample_seed`), so the views of a sample
do not depend on worker count, worker RNG or prefetching.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for the augmentation of sample ``index`` in ``epoch`` (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def fit_position(trainer) -> tuple[int, int]:
    """(epoch, batches already trained in it) according to Lightning's fit-loop counters.

    Read when a checkpoint is written (the data module stores it) and when an epoch's iterator
    is created (then ``(epoch, 0)``). A checkpoint written at the end of an epoch, or after its
    last batch, points at the start of the next epoch.
    """
    fit_loop = trainer.fit_loop
    epochs = fit_loop.epoch_progress.current
    if epochs.processed > epochs.completed:  # saved in on_train_epoch_end: that epoch is done
        return epochs.processed, 0
    done = fit_loop.epoch_loop.batch_progress.current.processed
    limits = getattr(fit_loop._combined_loader, "limits", None) or [float("inf")]
    if done and done >= limits[0]:  # saved after the epoch's last batch, before its end hooks
        return epochs.processed + 1, 0
    return epochs.processed, done


class ResumableSampler(DistributedSampler):
    """Seeded, epoch-dependent shuffling that shards across ranks and can start mid-epoch.

    Epoch ``e`` uses ``randperm(N, seed + e)``, truncated to a multiple of ``num_replicas``. Global
    batch ``k`` is the ``k``-th run of ``num_replicas x batch_size`` indices and rank ``r`` trains
    its ``r``-th block of ``batch_size``, so the ranks' batches concatenated in rank order are
    exactly the batch one process with ``num_replicas x batch_size`` would train (methods that
    draw per-sample randomness for the global batch keep rows ``r * B:(r + 1) * B``, and gathered
    embeddings keep the one-process order). A ``DistributedSampler`` subclass, so Lightning
    leaves it in place under DDP. It yields ``(index, seed)`` pairs; the data module applies the
    transform under that seed.

    Args:
        dataset: the training split (only its length is used).
        batch_size: per-rank batch size (to turn trained batches into skipped samples).
        num_replicas: world size.
        rank: global rank.
        seed: shuffling and augmentation seed.
        position: returns ``(epoch, batches already trained)`` when an iterator starts (e.g.
            ``lambda: fit_position(trainer)``); without it ``set_epoch`` decides and nothing is skipped.

    Examples:
        >>> sampler = ResumableSampler(range(10), batch_size=2, position=lambda: (0, 3))
        >>> len(list(sampler))  # 10 samples, 3 batches of 2 already trained
        4
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.position = position

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's dataset indices for ``epoch``, in order."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=g)[: self.total_size]
        per_step = self.num_replicas * self.batch_size
        full = self.total_size // per_step * per_step
        blocks = order[:full].view(-1, self.num_replicas, self.batch_size)[:, self.rank]  # (steps, B)
        # Fewer than a global batch left: dealt by rank like DistributedSampler (a short last batch
        # or, with drop_last, none); every rank still gets total_size / num_replicas indices.
        tail = order[full:][self.rank :: self.num_replicas]
        return torch.cat([blocks.flatten(), tail]).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, done_batches = self.position() if self.position is not None else (self.epoch, 0)
        skip = done_batches * self.batch_size
        self.epoch = epoch
        for i in self.epoch_indices(epoch)[skip:]:
            yield i, sample_seed(self.seed, epoch, i)

    def __len__(self) -> int:
        # Always the full epoch: Lightning counts the restored batches towards it.
        return self.num_samples

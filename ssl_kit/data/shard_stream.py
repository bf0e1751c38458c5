"""Training from WebDataset shards: disjoint shards per rank and loader worker, exact mid-epoch resume.

An epoch's plan is a function of (seed, epoch, world size, loader workers, shard sizes):

1. the shards are permuted with ``seed + epoch``; rank ``r`` takes every ``R``-th one from
   position ``r``, and its loader worker ``w`` every ``N``-th of those from ``w`` (a *stream*:
   each shard is read by exactly one process, sequentially, once per epoch);
2. a stream reads its shards in that order and shuffles them in consecutive blocks of
   ``shuffle_buffer`` samples (a seeded permutation per block, so memory stays bounded and a
   block can be re-read on resume);
3. each worker batches its stream; the loader takes batches from the workers in turn (PyTorch's
   order for iterable data sets), and every rank stops after ``steps`` batches, the same number
   for every rank and epoch (the fewest any rank can have: see :func:`steps_per_epoch`).

Each sample is augmented under its own seed ``sample_seed(seed, epoch, index)`` (``index``:
its number in :class:`~ssl_kit.data.shards.ShardSamples`), as on the folder path. Resuming at
(epoch, batches done) recomputes which batches each worker had delivered, so every worker
re-reads only its current block and continues with the next sample: nothing is repeated or
skipped, at the same world size and number of loader workers (the checkpoint records each
stream's shard and offset, and a resume with another layout is refused).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_kit.data.decode import EncodedImage, decode_rgb
from ssl_kit.data.sampler import sample_seed
from ssl_kit.data.shards import ShardSamples, image_suffix, label_of, side_info, stream_samples
from ssl_kit.errors import BadImageError, UserError

# Lightning warns that __len__ of an iterable data set may be wrong with several workers: here it is exact.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")


def assign_shards(num_shards: int, seed: int, epoch: int, world_size: int, workers: int) -> list[list[list[int]]]:
    """``[rank][worker]`` -> that stream's shard numbers in reading order for ``epoch``."""
    order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [[order[r::world_size][w::workers] for w in range(workers)] for r in range(world_size)]


def steps_per_epoch(counts: Sequence[int], world_size: int, workers: int, batch_size: int) -> int:
    """Batches every rank trains per epoch, the same for every epoch.

    Stream (r, w) always gets the same number of shards ``k``; whatever shards they are, it holds
    at least the ``k`` smallest counts. The bound is exact when the shards are equally large.
    """
    smallest = sorted(counts)
    n = len(counts)
    per_rank = []
    for r in range(world_size):
        shards = range(r, n, world_size)
        per_rank.append(sum(sum(smallest[: len(shards[w::workers])]) // batch_size for w in range(workers)))
    return min(per_rank)


def schedule(batches: Sequence[int], steps: int) -> list[int]:
    """The worker of each of a rank's first ``steps`` batches: PyTorch's loader takes one batch from
    each worker in turn and skips workers that have finished."""
    left, order = list(batches), []
    while len(order) < steps and any(left):
        for w in range(len(left)):
            if left[w] and len(order) < steps:
                order.append(w)
                left[w] -= 1
    return order


def block_order(seed: int, epoch: int, stream: int, block: int, size: int) -> list[int]:
    """The seeded permutation of one block of a stream."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, (stream << 24) + block))
    return torch.randperm(size, generator=g).tolist()


class ShardStream(IterableDataset):
    """The training split of :class:`ShardSamples` as per-rank, per-worker streams (see module doc).

    Args:
        data: the shards.
        indices: training sample numbers (held-out validation samples are read past, not trained).
        transform: the training transform (applied under each sample's seed).
        seeded: ``seeded(seed, transform, img)`` applies the transform with seeded RNGs.
        batch_size: per-rank batch size.
        world_size: number of ranks.
        rank: this rank.
        workers: loader workers (0: the main process reads one stream).
        seed: order and augmentation seed.
        shuffle_buffer: block size of the in-stream shuffle (samples held per worker).
        bad_images: ``error`` or ``skip`` (a bad sample is replaced by the next good one of its block).
        skipped: shared counter of skipped samples.
    """

    def __init__(self, data: ShardSamples, indices: Sequence[int], transform: Callable, seeded: Callable, *,
                 batch_size: int, world_size: int = 1, rank: int = 0, workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 1000, bad_images: str = "error", skipped=None) -> None:
        self.data, self.transform, self.seeded = data, transform, seeded
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.workers, self.seed = max(1, workers), seed
        self.shuffle_buffer, self.bad_images, self.skipped = max(1, shuffle_buffer), bad_images, skipped
        self.encoded = getattr(transform, "accepts_encoded", False)
        index = torch.as_tensor(list(indices), dtype=torch.long).sort().values
        starts = torch.as_tensor(data.starts, dtype=torch.long)
        shard = torch.bucketize(index, starts[1:], right=True)  # the shard of each training sample
        self.positions = [(index[shard == j] - starts[j]).tolist() for j in range(len(data.shards))]
        self.steps = steps_per_epoch([len(p) for p in self.positions], world_size, self.workers, batch_size)
        if self.steps < 1:
            raise UserError(f"{len(indices)} training samples in {len(data.shards)} shard(s) give rank(s) no full "
                             f"batch of {batch_size} with {world_size} rank(s) x {self.workers} loader stream(s) "
                             f"(each stream reads whole shards): use more shards or a smaller batch_size.")
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def start(self, epoch: int, batches_done: int) -> None:
        """Set the epoch and the batches this rank already trained in it (before an iterator starts)."""
        self.epoch, self.batches_done = epoch, batches_done

    def streams(self, epoch: int, batches_done: int = 0, rank: int | None = None) -> list[dict]:
        """Per loader worker of ``rank`` (default: this rank): its shards, batch quota, batches delivered."""
        rank = self.rank if rank is None else rank
        shards = assign_shards(len(self.data.shards), self.seed, epoch, self.world_size, self.workers)[rank]
        available = [sum(len(self.positions[j]) for j in s) // self.batch_size for s in shards]
        order = schedule(available, self.steps)
        quota, done = Counter(order), Counter(order[:batches_done])
        return [dict(stream=rank * self.workers + w, shards=shards[w], quota=quota[w], done=done[w])
                for w in range(self.workers)]

    def record(self, epoch: int, batches_done: int) -> dict:
        """The resume point of every stream of every rank: shard name and sample offset where its
        current block starts, and the samples it has delivered (saved in checkpoints)."""
        points = []
        for rank in range(self.world_size):
            for s in self.streams(epoch, batches_done, rank):
                emitted = s["done"] * self.batch_size
                shard, offset = self._ref_at(s["shards"], emitted // self.shuffle_buffer * self.shuffle_buffer)
                points.append([rank, s["stream"], emitted, self.data.shards[shard] if shard is not None else None, offset])
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
                "num_shards": len(self.data.shards), "shuffle_buffer": self.shuffle_buffer, "streams": points}

    def _refs(self, shards: Sequence[int]) -> list[tuple[int, int]]:
        """A stream's training samples in reading order, as (shard, position in the shard)."""
        return [(j, p) for j in shards for p in self.positions[j]]

    def _ref_at(self, shards: Sequence[int], k: int) -> tuple[int | None, int | None]:
        """``_refs(shards)[k]`` without building the list; (None, None) past the end."""
        for j in shards:
            if k < len(self.positions[j]):
                return j, self.positions[j][k]
            k -= len(self.positions[j])
        return None, None

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        streams = self.streams(self.epoch, self.batches_done)
        # The loader asks its workers in turn starting from worker 0, so after a resume worker 0
        # serves the stream whose batch comes next (the turn order is cyclic, the sequence unchanged).
        turn = schedule([s["quota"] for s in streams], self.steps)[self.batches_done:][:1] or [0]
        stream = streams[((info.id if info is not None else 0) + turn[0]) % len(streams)]
        refs = self._refs(stream["shards"])
        first, stop = stream["done"] * self.batch_size, stream["quota"] * self.batch_size
        reader = _Reader(self.data, self.bad_images, self._count_skip)
        try:
            for block in range(first // self.shuffle_buffer, -(-stop // self.shuffle_buffer)):
                lo = block * self.shuffle_buffer
                entries = [reader.read(j, p) for j, p in refs[lo: lo + self.shuffle_buffer]]
                order = block_order(self.seed, self.epoch, stream["stream"], block, len(entries))
                for t in range(max(first - lo, 0), min(stop - lo, len(entries))):
                    yield self._views(entries, order, t)
        finally:
            reader.close()

    def _views(self, entries: list, order: list[int], t: int):
        """Views and label of block position ``t``; a bad sample is replaced by the next good one."""
        index = entries[order[t]][0]
        seed = sample_seed(self.seed, self.epoch, index)
        for step in range(len(order)):
            _, name, sample = entries[order[(t + step) % len(order)]]
            try:
                img, label = self._decode(name, sample)
                return self.seeded(seed, self.transform, img), label
            except OSError as err:
                if self.bad_images == "error":
                    raise
                self._count_skip(f"skipping a bad sample (bad_images='skip'): {err}")
        raise BadImageError(f"no readable sample in a block of {len(order)} from shard(s) "
                      f"{sorted({e[1] for e in entries})[:3]}: are the shards corrupt? (see the warnings above)")

    def _decode(self, name: str, sample: dict | None):
        if sample is None:
            raise BadImageError(f"shard {name!r}: a sample is missing (the shard ended early; see the warning above).")
        key, suffix = sample["__key__"], image_suffix(sample)
        if suffix is None:
            members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise BadImageError(f"shard {name!r}: sample {key!r} has no image (members: {members}).")
        try:
            label = label_of(sample)
        except ValueError as err:
            raise BadImageError(f"shard {name!r}: sample {key!r} has an unreadable label ({err}).") from None
        info = side_info(sample, key, suffix)
        if self.encoded:
            return EncodedImage.open(sample[suffix], f"{name}:{key}.{suffix}", info), label
        img = decode_rgb(sample[suffix], f"{name}:{key}.{suffix}")
        img.info.update(info)
        return img, label

    def _count_skip(self, message: str) -> None:
        if self.skipped is not None:
            with self.skipped.get_lock():
                self.skipped.value += 1
        warnings.warn(message, stacklevel=3)


class _Reader:
    """Reads samples (shard, position) in increasing order through one open shard at a time."""

    def __init__(self, data: ShardSamples, bad_images: str, warn: Callable[[str], None]) -> None:
        self.data, self.bad_images, self.warn = data, bad_images, warn
        self.shard, self.pos, self.samples = None, -1, None

    def read(self, shard: int, pos: int) -> tuple[int, str, dict | None]:
        """(sample number, shard name, sample or None when the shard ended early / broke)."""
        name = self.data.shards[shard]
        if shard != self.shard or pos <= self.pos:
            self.close()
            self.shard, self.pos, self.samples = shard, -1, stream_samples(name)
        sample = None
        while self.pos < pos and self.samples is not None:
            try:
                sample = next(self.samples)
                self.pos += 1
            except (StopIteration, OSError) as err:
                self._ended(name, err)
        return self.data.starts[shard] + pos, name, sample if self.pos == pos else None

    def _ended(self, name: str, err: Exception) -> None:
        reason = str(err) if isinstance(err, OSError) else (
            f"shard {name!r} ended after {self.pos + 1} samples; "
            f"{self.data.sizes[self.data.shards.index(name)]} were expected (truncated, or a stale sizes.json)")
        self.samples = None
        if self.bad_images == "error":
            raise BadImageError(reason)
        warnings.warn(f"{reason} Its remaining samples are replaced (bad_images='skip').", stacklevel=4)

    def close(self) -> None:
        if self.samples is not None:
            self.samples.close()
        self.samples = None


class ShardLoader(DataLoader):
    """The training loader over a :class:`ShardStream`: sets the epoch and resume position on the
    stream before each epoch's workers start (fresh workers per epoch carry them).

    Args:
        stream: the data set.
        position: returns (epoch, batches already trained) when an epoch starts.
        **kwargs: DataLoader arguments (workers, pinning, ...).
    """

    def __init__(self, stream: ShardStream, position: Callable[[], tuple[int, int]], **kwargs) -> None:
        super().__init__(stream, batch_size=stream.batch_size, drop_last=True, persistent_workers=False, **kwargs)
        self.position = position

    def __iter__(self):
        self.dataset.start(*self.position())
        return super().__iter__()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def check_resume(saved: dict, now: dict) -> None:
    """Refuse to resume on shards when the streams would not continue where they stopped.

    Raises:
        ValueError: naming what differs (world size, loader workers, batch size, shards).
    """
    layout = ("world_size", "workers", "batch_size", "num_shards", "shuffle_buffer")
    changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in layout if saved.get(k) != now[k]]
    if not changed and saved.get("streams") != now["streams"]:
        first = next(i for i, (a, b) in enumerate(zip(saved["streams"], now["streams"])) if a != b)
        changed = [f"stream {first} was at {saved['streams'][first][3:]}, now {now['streams'][first][3:]} "
                   f"(the shards or their sizes changed)"]
    if changed:
        raise UserError("cannot resume exactly on shards: " + "; ".join(changed) + ". Resume with the same "
                         "--trainer.devices/num_nodes, --data.num_workers, --data.batch_size and shards "
                         "(workers = loader streams: each reads its own shards).")


def shard_loader(datamodule, split, seeded: Callable) -> ShardLoader:
    """The training loader of ``datamodule`` (``dataset: shards``) over its training ``split``."""
    dm, trainer, subset = datamodule, datamodule.trainer, split.subset
    stream = ShardStream(
        subset.dataset, subset.indices, split.transform, seeded, batch_size=dm.batch_size,
        world_size=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
        workers=dm.num_workers, seed=dm.sampler_seed(), shuffle_buffer=dm.shuffle_buffer,
        bad_images=dm.bad_images, skipped=dm._skipped,
    )
    if dm._resume_shards is not None and dm._resume_position is not None:  # resuming: refuse before training
        check_resume(dm._resume_shards, stream.record(*dm._resume_position))
    return ShardLoader(stream, dm._sampler_position if trainer else (lambda: (0, 0)), num_workers=dm.num_workers,
                       pin_memory=torch.cuda.is_available())

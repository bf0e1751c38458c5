"""One LightningDataModule for every method: it asks the model for its views."""

from __future__ import annotations

import os
import random
import warnings
from multiprocessing import Value
from typing import Callable, Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_kit.data.datasets import Digits, ImageFolder, LabeledImages, SyntheticImages
from ssl_kit.data.shards import ShardSamples
from ssl_kit.data.sampler import ResumableSampler, fit_position
from ssl_kit.errors import BadImageError, UserError

#: How many following indices a skipped unreadable image may look through for a readable one.
MAX_BAD_RUN = 64


def _default_workers() -> int:
    return min(8, os.cpu_count() or 1)


class SSLDataModule(pl.LightningDataModule):
    """Images for pretraining and labelled splits for evaluation.

    The training transform comes from the model (``model.train_transform()``) and the evaluation
    transform from ``model.eval_transform()``, so a method's views are defined in one place. A
    caller without a trainer (evaluation jobs) passes them to :meth:`set_transforms`.

    Args:
        dataset: ``folder`` (images under ``root``), ``shards`` (WebDataset tar shards named by
            ``root``, see :mod:`ssl_kit.data.shards`), ``digits`` (scikit-learn's bundled digits) or
            ``synthetic`` (generated, for tests and benchmarks).
        root: image folder (recursive; first-level sub-folders are classes if every image has one),
            or for ``shards`` a shard pattern (``/data/train-{000000..000146}.tar``, ``pipe:...``, URLs).
        val_root: a separate validation folder (shards for ``shards``); otherwise ``val_fraction``
            of ``root`` is held out.
        val_fraction: held-out share when there is no ``val_root`` (seeded, fixed split).
        batch_size: per-device batch size.
        eval_batch_size: batch size for feature extraction (defaults to ``batch_size``).
        num_workers: loader processes (default: min(8, CPUs)).
        image_size: side of the stored digits / synthetic images.
        synthetic_size: number of synthetic images.
        seed: seed of the train/val split, and of the training order and augmentations unless
            ``seed_everything`` is set (then its seed is used, as Lightning's samplers do).
        bad_images: what an unreadable image (truncated, zero-byte, not an image) does: ``error``
            raises naming the file; ``skip`` logs it, counts it (:attr:`skipped_images`) and
            uses the next readable index instead, so the replacement is the same on every rank.
        shuffle_buffer: ``shards`` only: each loader worker reads its shards in order and shuffles
            blocks of this many samples (it holds that many encoded images in memory; 1: no shuffling).
        gpu_decode: decode training JPEGs on the GPU (nvJPEG) instead of in the loader workers,
            for single-crop views (MAE, FCMAE, EVA); only used when training on CUDA.
    """

    def __init__(
        self,
        dataset: Literal["folder", "shards", "digits", "synthetic"] = "folder",
        root: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        image_size: int = 32,
        synthetic_size: int = 256,
        seed: int = 0,
        bad_images: Literal["error", "skip"] = "skip",
        shuffle_buffer: int = 1000,
        gpu_decode: bool = False,
    ) -> None:
        super().__init__()
        if bad_images not in ("error", "skip"):
            raise UserError(f"bad_images={bad_images!r} is not allowed: use 'error' or 'skip'.")
        self.bad_images = bad_images
        self._skipped = Value("q", 0)  # shared with loader workers
        self._resume_position: tuple[int, int] | None = None
        self._sampler_seed: int | None = None  # a resumed run keeps the order seed of the original
        self._resume_shards: dict | None = None  # shards: the checkpoint's stream positions, checked on resume
        self.shuffle_buffer, self.gpu_decode, self._stream = shuffle_buffer, gpu_decode, None
        if dataset in ("folder", "shards") and root is None:
            raise UserError(f"data.dataset={dataset!r} needs data.root (a directory of images, or shards "
                            f"for 'shards'); or use data.dataset='digits' or 'synthetic'.")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"val_fraction={val_fraction} is not allowed: use 0 <= val_fraction < 1.")
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} is not allowed: it must be >= 1.")
        if shuffle_buffer < 1:
            raise UserError(f"shuffle_buffer={shuffle_buffer} is not allowed: it must be >= 1 (1: no shuffling).")
        self.dataset, self.root, self.val_root = dataset, root, val_root
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = _default_workers() if num_workers is None else num_workers
        self.image_size, self.synthetic_size = image_size, synthetic_size
        self.train_transform: Callable | None = None
        self.eval_transform: Callable | None = None
        self._splits: dict[str, Dataset] | None = None

    def set_transforms(self, train: Callable | None, eval: Callable | None) -> None:
        self.train_transform, self.eval_transform = train, eval

    def check(self) -> None:
        """Scan the data now (before any long work) so a bad root fails at start."""
        splits = self._build_splits()
        if self.dataset == "shards" and len(splits["val"]):
            _base(splits["val"]).check_random_access("the validation split (data.val_fraction / data.val_root)")

    def _source(self, root: str | None, classes: list[str] | None = None) -> LabeledImages:
        if self.dataset == "digits":
            return Digits(size=self.image_size)
        if self.dataset == "synthetic":
            return SyntheticImages(self.synthetic_size, size=self.image_size)
        if self.dataset == "shards":
            return ShardSamples(root, classes=classes, bad_images=self.bad_images)
        return ImageFolder(root, classes=classes)

    def _build_splits(self) -> dict[str, Dataset]:
        if self._splits is not None:
            return self._splits
        full = self._source(self.root)
        if self.val_root is not None:
            val_source = self._source(self.val_root, classes=full.classes or None)
            train_idx, val_idx = list(range(len(full))), None
        else:
            g = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(full), generator=g).tolist()
            n_val = int(round(len(full) * self.val_fraction))
            val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
            val_source = full
        self._splits = {
            "train": Subset(full, train_idx),
            "val": Subset(val_source, val_idx if val_idx is not None else range(len(val_source))),
        }
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.train_transform is None and model is not None:
            self.train_transform = model.train_transform()
        if self.eval_transform is None and model is not None:
            self.eval_transform = model.eval_transform()
        self._build_splits()

    def split(self, name: Literal["train", "val"], transform: Callable | None) -> Dataset:
        """The ``train`` or ``val`` split with ``transform`` applied to every image."""
        subset = self._build_splits()[name]
        return _Transformed(subset, transform, self.bad_images, self._skipped)

    @property
    def skipped_images(self) -> int:
        """Failed image reads replaced so far by this rank's loader processes (each read counts)."""
        return int(self._skipped.value)

    def __getstate__(self) -> dict:
        # A multiprocessing.Value made in this (fork) context cannot travel to spawned processes
        # (ddp_spawn): send the count and make a fresh shared counter on arrival.
        state = dict(self.__dict__)
        state["_skipped"] = self.skipped_images
        return state

    def __setstate__(self, state: dict) -> None:
        state["_skipped"] = Value("q", state["_skipped"])
        self.__dict__.update(state)

    def teardown(self, stage: str) -> None:
        if self.skipped_images:
            print(f"SSLDataModule: skipped {self.skipped_images} unreadable image(s) (bad_images='skip').")

    def has_labels(self) -> bool:
        splits = self._build_splits()
        return all(_base(s).has_labels for s in splits.values())

    def classes(self) -> list[str]:
        return _base(self._build_splits()["train"]).classes

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=train and self.num_workers > 0,
        )

    def _train_loader(self, dataset: Dataset) -> DataLoader:
        # Order and augmentations are functions of (seed, epoch, index): see ResumableSampler.
        trainer = self.trainer
        seed = self.sampler_seed()
        sampler = ResumableSampler(
            dataset, self.batch_size,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0,
            seed=seed, position=self._sampler_position if trainer else None,
        )
        return _ResumableLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),  # creating iterators leaves the global RNG alone
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_transform is None:
            raise RuntimeError("SSLDataModule has no training transform: attach it to a model or call set_transforms().")
        transform = self.train_transform
        if self.gpu_decode:
            from ssl_kit.data.gpu_decode import gpu_view

            transform = gpu_view(transform, self.trainer)
        dataset = self.split("train", transform)
        if len(dataset) < self.batch_size:
            raise UserError(f"the training split has {len(dataset)} images, fewer than batch_size={self.batch_size}.")
        if self.dataset == "shards":
            from ssl_kit.data.shard_stream import shard_loader

            loader = shard_loader(self, dataset, _seeded)
            self._stream = loader.dataset
            return loader
        return self._train_loader(dataset)

    def eval_dataloader(self, name: Literal["train", "val"]) -> DataLoader:
        """Deterministic, labelled, un-augmented loader over a split (for k-NN and probes)."""
        return self._loader(self.split(name, self.eval_transform), self.eval_batch_size, train=False)

    # --- exact resume: the sampler's seed and position travel in the checkpoint ----------------
    def sampler_seed(self) -> int:
        """Seed of the training order and augmentations (see ``seed``)."""
        if self._sampler_seed is not None:
            return self._sampler_seed
        return int(os.environ.get("PL_GLOBAL_SEED", self.seed))

    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        epoch, batches_done = fit_position(self.trainer)
        state = {"sampler_seed": self.sampler_seed(), "sampler_epoch": epoch, "sampler_batches_done": batches_done}
        if self._stream is not None:  # shards: each stream's shard and offset, checked when resuming
            state["shards"] = self._stream.record(epoch, batches_done)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # Restored before the trainer's loops are (and before the first training iterator is made).
        if "sampler_epoch" in state_dict:
            self._sampler_seed = int(state_dict["sampler_seed"])
            self._resume_position = (int(state_dict["sampler_epoch"]), int(state_dict["sampler_batches_done"]))
        self._resume_shards = state_dict.get("shards")

    def _sampler_position(self) -> tuple[int, int]:
        if self._resume_position is not None:
            position, self._resume_position = self._resume_position, None
            return position
        return fit_position(self.trainer)


class _ResumableLoader(DataLoader):
    """Marks the training loader as resumable for Lightning: the sampler restores the position."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class _Transformed(Dataset):
    """A view of a subset with its own transform (the same images serve training and evaluation).

    An index may be an ``(index, seed)`` pair (from :class:`ResumableSampler`): the transform then
    draws from torch and Python RNGs seeded with ``seed``, whatever process runs it.
    """

    def __init__(self, subset: Subset, transform: Callable | None, bad_images: str = "error", skipped=None) -> None:
        self.subset, self.transform = subset, transform
        self.bad_images, self.skipped = bad_images, skipped
        self.encoded = getattr(transform, "accepts_encoded", False)  # fast decode: see ssl_kit/data/decode.py

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        base = self.subset.dataset
        i, img = self._load(index)
        if self.transform is not None:
            img = self.transform(img) if seed is None else _seeded(seed, self.transform, img)
        return img, base.labels[i]

    def _load(self, index: int):
        """(dataset index, image) of ``index``, or under ``skip`` of the next readable one."""
        base, n = self.subset.dataset, len(self.subset)
        for step in range(min(n, MAX_BAD_RUN)):
            i = self.subset.indices[(index + step) % n]
            try:
                return i, base.load_encoded(i) if self.encoded else base.load(i)
            except OSError as err:
                if self.bad_images == "error":
                    raise BadImageError(f"{err} (data.bad_images='error'; 'skip' trains past unreadable files)") from err
                if self.skipped is not None:
                    with self.skipped.get_lock():
                        self.skipped.value += 1
                warnings.warn(f"skipping unreadable image (bad_images='skip'): {err}", stacklevel=2)
        raise BadImageError(f"{min(n, MAX_BAD_RUN)} consecutive unreadable images from split index {index}; "
                      f"is the data folder corrupt? (see the warnings above for the files)")


def _seeded(seed: int, fn: Callable, img):
    """``fn(img)`` with torch's CPU and Python RNGs seeded by ``seed``; the caller's RNG states are kept.

    Goes through ``torch.default_generator`` rather than ``torch.manual_seed``/``fork_rng``: the
    same CPU stream, but ~5 us instead of ~250 us per image (those also visit every accelerator
    backend), which was most of the cost of a small image's augmentation.
    """
    gen = torch.default_generator
    torch_state, py_state = gen.get_state(), random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        return fn(img)
    finally:
        gen.set_state(torch_state)
        random.setstate(py_state)


def _base(subset: Subset) -> LabeledImages:
    return subset.dataset

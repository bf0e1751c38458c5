"""Exact resume: a run killed after a checkpoint and resumed ends bit-identical to an uninterrupted one.

Every method of the tiny zoo (``tests/method_zoo.py``) is covered: a new method is one entry
there (its import path, tiny constructor kwargs and optional data-module kwargs). Everything in
the final checkpoint is compared (weights including any EMA target registered as a module or
buffer, optimizer and lr-scheduler state, loop counters, RNG states), bitwise (``torch.equal``),
so the entry is all a method needs; a method that cannot be bitwise exact lists its bound in
``TOLERANCE`` with the reason.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from method_zoo import ZOO, kwargs_of
from ssl_kit.callbacks import RunCheckpoint
from ssl_kit.data import SSLDataModule
from ssl_kit.checkpoints import load_checkpoint

#: The base lr unscaled and constant (AdamW 1.5e-4, LARS 0.2): every step moves the weights by
#: ~1e-4, so a step that differs after resuming (a wrong mask on the last one) changes them visibly.
#: At the recipe's lr x 4/256 with cosine decay six steps moved them ~1e-5 in all.
LR = dict(lr_scaling=False, min_lr_ratio=1.0)

#: method id -> (class path, tiny constructor kwargs, data-module kwargs overrides): the tiny zoo
#: (``tests/method_zoo.py``; a new method is one entry there) at the constant lr above.
METHODS = {name: (path, {**kwargs_of(name), **LR}, data) for name, (path, _, data) in ZOO.items()}

#: Largest float difference allowed per method: none (bitwise, ``torch.equal``) unless listed.
TOLERANCE: dict[str, float] = {}

DATA = dict(dataset="synthetic", synthetic_size=12, image_size=32, val_fraction=0.0, batch_size=4)
STEPS_PER_EPOCH, EPOCHS = 3, 2


class Crash(Exception):
    """Stands in for the process being killed."""


class CrashAt(pl.Callback):
    """Raise when ``global_step`` reaches ``step`` (before that step runs)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def fit(method: str, run_dir: Path, seed: int, ckpt_path=None, crash_at=None, every_n_train_steps=0, workers=0,
        data: dict | None = None) -> Path:
    """Build a fresh model and trainer (as a new process would) and fit; returns the run's last.ckpt.
    ``data`` overrides the data module's arguments (e.g. shards instead of synthetic images)."""
    class_path, kwargs, data_kwargs = METHODS[method]
    module_name, class_name = class_path.rsplit(".", 1)
    pl.seed_everything(seed)
    model = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    datamodule = SSLDataModule(**{**DATA, **data_kwargs, **(data or {})}, num_workers=workers)
    callbacks = [RunCheckpoint(str(run_dir), every_n_train_steps=every_n_train_steps)]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir), deterministic=True,
    )
    if crash_at is None:
        trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Crash):
            trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return run_dir / "last.ckpt"


def assert_same(a, b, where: str = "checkpoint", atol: float = 0.0) -> None:
    """Recursive equality of checkpoint contents: bitwise (``torch.equal``), or float tensors
    within ``atol`` when a method needs a tolerance (see ``TOLERANCE``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if atol and a.is_floating_point():
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            assert diff <= atol, f"{where}: max diff {diff:.3g}"
        else:
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() and a.numel() else 0.0
            assert torch.equal(a, b), f"{where}: not bitwise equal (max diff {diff:.3g})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", atol)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def comparable(ckpt: dict) -> dict:
    """Everything that defines the training state (callback states hold run-directory paths)."""
    return {k: v for k, v in ckpt.items() if k not in ("callbacks",)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """last.ckpt of one uninterrupted run per method (shared by the resume cases)."""
    cache = {}

    def get(method: str) -> dict:
        if method not in cache:
            get.run_dirs[method] = tmp_path_factory.mktemp(f"ref-{method}")  # also holds epoch=NNNN.ckpt
            cache[method] = load_checkpoint(fit(method, get.run_dirs[method], seed=0))
        return cache[method]

    get.run_dirs = {}
    return get


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "crash_at,every_n_train_steps,workers,saved_step",
    [
        (5, 0, 0, 3),  # killed in epoch 2: resumes from the end-of-epoch-1 last.ckpt
        (5, 2, 2, 4),  # last.ckpt every 2 steps, killed at step 5: resumes mid-epoch 2 (+ loader workers)
    ],
    ids=["end-of-epoch", "mid-epoch"],
)
def test_resume_is_exact(method, crash_at, every_n_train_steps, workers, saved_step, reference, tmp_path):
    last = fit(method, tmp_path, seed=0, crash_at=crash_at, every_n_train_steps=every_n_train_steps)
    assert load_checkpoint(last)["global_step"] == saved_step  # the steps after it are lost and redone
    # A new process: different global seed, fresh init; everything must come from the checkpoint.
    fit(method, tmp_path, seed=1234, ckpt_path=str(last), every_n_train_steps=every_n_train_steps, workers=workers)
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert_same(comparable(reference(method)), comparable(resumed), atol=TOLERANCE.get(method, 0.0))


def test_a_wrong_mask_on_the_last_step_is_seen(reference, tmp_path, monkeypatch):
    """The check above can fail: a resumed MAE whose last step (global step 5) draws another mask
    ends with weights that differ, far beyond float noise (the old 1e-6 tolerance included)."""
    from ssl_kit.methods import MAE

    draw = MAE.draw_masks

    def wrong_on_last_step(self, batch_size, mask_ratio, device):
        ids_keep, mask, ids_restore = draw(self, batch_size, mask_ratio, device)
        if self.training and self.trainer.global_step == EPOCHS * STEPS_PER_EPOCH - 1:
            return ids_keep.roll(1, 0), mask.roll(1, 0), ids_restore.roll(1, 0)  # each sample gets another's mask
        return ids_keep, mask, ids_restore

    expected = reference("mae")["state_dict"]  # before the patch
    last = tmp_path / "last.ckpt"  # the reference run after epoch 1, as a run killed in epoch 2 leaves it
    shutil.copy(reference.run_dirs["mae"] / "epoch=0000.ckpt", last)
    assert load_checkpoint(last)["global_step"] == STEPS_PER_EPOCH
    monkeypatch.setattr(MAE, "draw_masks", wrong_on_last_step)
    fit("mae", tmp_path, seed=1234, ckpt_path=str(last))
    resumed = load_checkpoint(last)["state_dict"]
    with pytest.raises(AssertionError, match="not bitwise equal"):
        assert_same(expected, resumed)
    assert max((expected[k] - resumed[k]).abs().max().item() for k in expected) > 1e-5


def test_rng_states_roundtrip_through_a_weights_only_file(tmp_path):
    """torch, NumPy, Python and a module's own masking generator continue exactly after a reload."""
    import random

    import numpy as np

    from ssl_kit.callbacks.rng_state import capture_rng_state, restore_rng_state

    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module[0].mask_generator = torch.Generator().manual_seed(7)
    draw = lambda: (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=module[0].mask_generator))  # noqa: E731
    torch.save(capture_rng_state(module), tmp_path / "rng.pt")
    expected = draw()
    torch.manual_seed(99), np.random.seed(99), random.seed(99), module[0].mask_generator.manual_seed(99)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), module)
    got = draw()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])

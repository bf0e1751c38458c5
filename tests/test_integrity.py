"""Integrity: per-tensor checksums on every checkpoint and export, non-finite weights refused,
resume from the newest good checkpoint whatever its name, a run directory that moved, and the
resume compatibility check."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch

from conftest import TINY_MAE
from ssl_kit.callbacks import RunCheckpoint, SafeCheckpointIO
from ssl_kit.callbacks.resume_guard import ResumeGuard
from ssl_kit.data import SSLDataModule
from ssl_kit.errors import CorruptCheckpointError, NoSpaceError, ResumeMismatchError
from ssl_kit.checkpoints import load_checkpoint
from ssl_kit.export import export
from ssl_kit.methods import MAE
from ssl_kit.run_dir import resume_checkpoint

ENCODER = dict(img_size=32, patch_size=4)
TARGET = "encoder.blocks.0.attn.qkv.weight"


def ssl_checkpoint(path: Path, step: int, seed: int = 0, nan: bool = False) -> dict:
    """An ssl_kit-format checkpoint of a random test_vit, written as training writes them."""
    torch.manual_seed(seed)
    state = {f"encoder.{k}": v for k, v in timm.create_model("test_vit", num_classes=0, **ENCODER).state_dict().items()}
    if nan:
        state[TARGET][3, 5] = float("nan")
    ckpt = {"global_step": step, "state_dict": state,
            "ssl_kit": {"method": "MAE", "encoder_name": "test_vit", "encoder_kwargs": ENCODER, "run_seed": 0}}
    SafeCheckpointIO().save_checkpoint(ckpt, path)
    return ckpt


def flip_inside(path: Path, tensor: torch.Tensor, n: int = 4096) -> None:
    """Invert ``n`` bytes of ``tensor``'s data where it lies in the file (a bad block)."""
    data, needle = bytearray(path.read_bytes()), tensor.contiguous().numpy().tobytes()[:64]
    at = data.find(needle)
    assert at >= 0
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


# --- checksums -------------------------------------------------------------------------------
def test_a_flipped_block_is_refused_naming_the_tensor_and_the_good_checkpoint(tmp_path):
    ssl_checkpoint(tmp_path / "epoch=0000.ckpt", step=4)
    ckpt = ssl_checkpoint(tmp_path / "last.ckpt", step=8)
    assert set(load_checkpoint(tmp_path / "last.ckpt")) == set(ckpt)  # intact: loads, record removed
    flip_inside(tmp_path / "last.ckpt", ckpt["state_dict"][TARGET])
    with pytest.raises(CorruptCheckpointError) as error:
        load_checkpoint(tmp_path / "last.ckpt")
    message = str(error.value)
    assert f"tensor 'state_dict/{TARGET}' differs from its recorded checksum" in message
    assert f"The newest good checkpoint beside it is {tmp_path / 'epoch=0000.ckpt'} (global step 4)" in message
    with pytest.raises(CorruptCheckpointError, match="last.ckpt is corrupt"):
        export(str(tmp_path / "last.ckpt"), str(tmp_path / "enc.safetensors"))
    assert not (tmp_path / "enc.safetensors").exists()


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    ssl_checkpoint(tmp_path / "nan.ckpt", step=8, nan=True)  # checksums match: the NaN was saved
    with pytest.raises(CorruptCheckpointError, match=rf"weight '{TARGET}' holds 1 non-finite value"):
        load_checkpoint(tmp_path / "nan.ckpt")
    from ssl_kit.checkpoints.load import load_weights

    model = timm.create_model("test_vit", num_classes=0, **ENCODER)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_embed"][0, 0, 0] = float("inf")
    with pytest.raises(CorruptCheckpointError, match="weight 'pos_embed' holds 1 non-finite"):
        load_weights(model, state, "official.pth")  # any source: official checkpoints, exports


def test_truncated_file_is_not_reported_as_a_security_refusal(tmp_path):
    path = tmp_path / "last.ckpt"
    ssl_checkpoint(path, step=8)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError, match="last.ckpt is truncated or not a checkpoint") as error:
        load_checkpoint(path)
    assert "refusing" not in str(error.value)


def test_exports_carry_checksums_and_load_encoder_verifies_them(tmp_path):
    from safetensors import safe_open

    from ssl_kit import load_encoder

    ssl_checkpoint(tmp_path / "last.ckpt", step=8)
    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "enc.safetensors"))
    assert "ssl_kit_checksums" in safe_open(str(out), "pt").metadata()
    load_encoder(str(out))  # intact
    with safe_open(str(out), "pt") as f:
        flip_inside(out, f.get_tensor(TARGET.removeprefix("encoder.")), n=256)
    with pytest.raises(CorruptCheckpointError, match=r"enc.safetensors is corrupt: tensor 'blocks.0.attn.qkv.weight'"):
        load_encoder(str(out))


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``budget`` bytes (torch's zip writer wraps it)."""

    def __init__(self, f, budget: int) -> None:
        self.f, self.budget = f, budget

    def write(self, data) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    ssl_checkpoint(path, step=4)
    before = path.read_bytes()
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, _FullDisk(f, 10_000)))
    with pytest.raises(NoSpaceError, match=r"no space left on the device writing .*last.ckpt; the previous last.ckpt "
                                           r"is intact.*--ckpt_path last"):
        ssl_checkpoint(path, step=8)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


# --- which checkpoint a resume starts from ---------------------------------------------------
def test_resume_takes_the_newest_good_checkpoint_by_step_not_by_name_or_time(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    ssl_checkpoint(tmp_path / "epoch=0002.ckpt", step=12)
    ssl_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", step=10)
    time.sleep(0.01)
    ssl_checkpoint(tmp_path / "last.ckpt", step=8)  # newest file, older state (a copy restored last.ckpt)
    assert resume_checkpoint(tmp_path, "last") == str(tmp_path / "epoch=0002.ckpt")
    assert "at global step 12" in capsys.readouterr().out

    good = tmp_path / "epoch=0002.ckpt"
    truncated = good.read_bytes()[:3000]
    good.write_bytes(truncated)
    assert resume_checkpoint(tmp_path, "last") == str(tmp_path / "hpc_ckpt_1.ckpt")
    out = capsys.readouterr().out
    assert "epoch=0002.ckpt is unusable (is truncated or not a checkpoint" in out
    assert "kept as epoch=0002.ckpt.corrupt" in out and "(the newest good checkpoint)" in out
    assert (tmp_path / "epoch=0002.ckpt.corrupt").read_bytes() == truncated  # kept, byte for byte


# --- a run directory that moved --------------------------------------------------------------
DATA = dict(dataset="synthetic", synthetic_size=12, image_size=32, val_fraction=0.0, batch_size=4, num_workers=0)


def fit(run_dir: Path, epochs: int, ckpt_path=None, crash_at: int | None = None, guard: ResumeGuard | None = None,
        data: dict | None = None, accumulate: int = 1) -> pl.Trainer:
    torch.manual_seed(0)
    callbacks = [RunCheckpoint(str(run_dir), every_n_train_steps=1), guard or ResumeGuard()]
    if crash_at is not None:
        callbacks.append(CrashAt(crash_at))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir),
                         accumulate_grad_batches=accumulate)
    model, dm = MAE(**{**TINY_MAE, "model_name": "test_vit"}), SSLDataModule(**{**DATA, **(data or {})})
    if crash_at is None:
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Crash):
            trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


class Crash(Exception):
    """Stands in for the process being killed."""


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"killed at step {self.step}")


def test_last_ckpt_follows_the_directory_after_a_move_and_a_copy(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    fit(a, epochs=1)
    a.rename(b)
    for epochs in (2, 3):  # twice in a row: each resume passes the step the last one reached
        fit(b, epochs=epochs, ckpt_path=str(b / "last.ckpt"))
        assert load_checkpoint(b / "last.ckpt")["global_step"] == 3 * epochs
    assert sorted(p.name for p in b.glob("*.ckpt")) == ["epoch=0000.ckpt", "epoch=0001.ckpt", "epoch=0002.ckpt",
                                                        "last.ckpt"]


# --- resume compatibility --------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(data={"batch_size": 2}), "batch_size 4 -> 2"),
    (dict(data={"synthetic_size": 16}), "train_samples 12 -> 16"),
    (dict(accumulate=2), "accumulate_grad_batches 1 -> 2"),
])
def test_resume_with_changed_batch_data_or_accumulation_is_refused(tmp_path, change, message):
    fit(tmp_path, epochs=2, crash_at=2)
    with pytest.raises(ResumeMismatchError, match=rf"cannot resume exactly: {message} .*--resume.allow_changes true"):
        fit(tmp_path, epochs=2, ckpt_path=str(tmp_path / "last.ckpt"), **change)


def test_allowed_change_continues_from_the_same_sample_position(tmp_path):
    fit(tmp_path, epochs=2, crash_at=2)  # epoch 0: 2 batches of 4 = 8 of 12 images trained
    trainer = fit(tmp_path, epochs=1, ckpt_path=str(tmp_path / "last.ckpt"), guard=ResumeGuard(allow_changes=True),
                  data={"batch_size": 2})
    # 8 images = 4 batches of 2 already trained; the epoch (6 batches of 2) ends after 2 more steps.
    assert trainer.global_step == 4
    assert load_checkpoint(tmp_path / "last.ckpt")["ssl_kit_resume"]["batch_size"] == 2



class CrashAtEpochEnd(pl.Callback):
    """Dies after the epoch's last batch, before the epoch-end hooks (checkpoint callbacks run last)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        raise Crash("killed between the last batch and the end of the epoch")


def _fit_exact(run_dir: Path, ckpt_path=None, crash: pl.Callback | None = None) -> Path:
    pl.seed_everything(0)
    callbacks = [RunCheckpoint(str(run_dir), every_n_train_steps=1), *([crash] if crash else [])]
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, callbacks=callbacks)
    model, data = MAE(**{**TINY_MAE, "model_name": "test_vit"}), SSLDataModule(**DATA)
    if crash is None:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    else:
        with pytest.raises(Crash):
            trainer.fit(model, data, ckpt_path=ckpt_path)
    return run_dir / "last.ckpt"


def test_killed_after_an_epochs_last_batch_then_mid_epoch_resumes_exactly(tmp_path):
    """Kills between an epoch's last batch and its end, with a mid-epoch kill between them (found
    by test_faults with SSL_KIT_FAULT_SEED=24: the last resume trained one batch twice)."""
    reference = load_checkpoint(_fit_exact(tmp_path / "ref"))
    last = _fit_exact(tmp_path / "run", crash=CrashAtEpochEnd())
    _fit_exact(tmp_path / "run", ckpt_path=str(last), crash=CrashAt(4))  # mid epoch 1
    _fit_exact(tmp_path / "run", ckpt_path=str(last), crash=CrashAtEpochEnd())  # after epoch 1's last batch
    resumed = load_checkpoint(_fit_exact(tmp_path / "run", ckpt_path=str(last)))
    assert resumed["global_step"] == reference["global_step"] == 9
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


class SignalAtStep(pl.Callback):
    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_in_an_epochs_last_batch_saves_at_the_epoch_end(tmp_path):
    """Not between the last batch and the epoch end (see above), and not Lightning's exit without a checkpoint."""
    import signal

    torch.manual_seed(0)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[RunCheckpoint(str(tmp_path), every_n_train_steps=1), SignalAtStep(signal.SIGTERM, 2)])
    with pytest.raises(SystemExit) as exit_info:
        trainer.fit(MAE(**{**TINY_MAE, "model_name": "test_vit"}), SSLDataModule(**DATA))
    assert exit_info.value.code == 128 + signal.SIGTERM
    ckpt = load_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 3 and ckpt["SSLDataModule"]["sampler_epoch"] == 1
    assert (tmp_path / "epoch=0000.ckpt").exists()  # the epoch's end ran before the exit

"""Reliability: no silent fresh start, preemption, atomic checkpoints, NaN guard, safe loading."""

from __future__ import annotations

import math
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import REPO, TINY_MAE, assert_ok, run_cli
from ssl_kit.callbacks import NaNGuard, NonFiniteLossError, RunCheckpoint, SafeCheckpointIO
from ssl_kit.run_dir import resume_checkpoint
from ssl_kit.data import SSLDataModule
from ssl_kit.errors import MissingFileError
from ssl_kit.checkpoints import load_checkpoint
from ssl_kit.methods import MAE

DATA = dict(dataset="synthetic", synthetic_size=12, image_size=32, val_fraction=0.0, batch_size=4, num_workers=0)


def trainer(run_dir: Path, callbacks: list, max_epochs: int = 2) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run_dir))


# --- 2. no silent fresh start ---------------------------------------------------------------
def test_last_without_checkpoint_is_an_error_unless_if_exists(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(MissingFileError, match="no good checkpoint .*last.ckpt.* to resume from.*last_if_exists"):
        resume_checkpoint(tmp_path, "last")
    assert resume_checkpoint(tmp_path, "last_if_exists") is None  # asked for "if possible": fresh start
    torch.save({}, tmp_path / "last.ckpt")
    time.sleep(0.01)
    torch.save({}, tmp_path / "hpc_ckpt_1.ckpt")  # newer: a SLURM requeue save
    assert resume_checkpoint(tmp_path, "last") == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert resume_checkpoint(tmp_path, None) is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job resumes without being told
    assert resume_checkpoint(tmp_path, None) == str(tmp_path / "hpc_ckpt_1.ckpt")


@pytest.mark.parametrize("files, newest", [
    ({"last.ckpt": 1}, "last.ckpt"),
    ({"hpc_ckpt_1.ckpt": 1}, "hpc_ckpt_1.ckpt"),
    ({"last.ckpt": 2, "hpc_ckpt_1.ckpt": 1}, "last.ckpt"),
    ({"last.ckpt": 1, "hpc_ckpt_1.ckpt": 2}, "hpc_ckpt_1.ckpt"),
    ({"last.ckpt": 2, "hpc_ckpt_1.ckpt": 1, "hpc_ckpt_2.ckpt": 3}, "hpc_ckpt_2.ckpt"),
    ({"last.ckpt": 3, "hpc_ckpt_1.ckpt": 1, "hpc_ckpt_2.ckpt": 2, "epoch=0009.ckpt": 4}, "epoch=0009.ckpt"),
    ({"last.ckpt": 4, "hpc_ckpt_1.ckpt": 1, "epoch=0009.ckpt": 3}, "last.ckpt"),
    ({"epoch=0009.ckpt": 1}, "epoch=0009.ckpt"),
    ({}, None),
], ids=["only-last", "only-hpc", "last-newer", "hpc-newer", "newest-of-two-hpc", "numbered-newest", "numbered-older",
        "only-numbered", "none"])
def test_resume_picks_the_newest_checkpoint_of_the_run_directory(tmp_path, files, newest):
    """last.ckpt, hpc_ckpt_N.ckpt and epoch=NNNN.ckpt all count; the newest (here: the highest
    global step, saved in that order) is resumed from."""
    for name, age_rank in files.items():  # modification times 1000 s apart, in the given order
        torch.save({"global_step": age_rank}, tmp_path / name)
        os.utime(tmp_path / name, (1_700_000_000 + 1000 * age_rank,) * 2)
    found = resume_checkpoint(tmp_path, "last_if_exists")
    assert (Path(found).name if found is not None else None) == newest


# --- 3. preemption ---------------------------------------------------------------------------
class SendSignal(pl.Callback):
    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_saves_last_at_end_of_step_and_exits(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, [RunCheckpoint(str(tmp_path)), NaNGuard(), SendSignal(signal.SIGUSR1, step=1)], max_epochs=5)
    with pytest.raises(SystemExit) as exit_info:
        t.fit(MAE(**TINY_MAE), SSLDataModule(**DATA))
    assert exit_info.value.code == 128 + signal.SIGUSR1
    # Mid-epoch, after the signalled step; and everything training writes loads with weights_only=True
    # (hyper-parameters, callback, RNG and data-module states).
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert {"rng_states", "SSLDataModule", "hyper_parameters", "callbacks"} <= set(ckpt)
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handlers restored


FIT_ARGS = [
    "--model", "ssl_kit.methods.MAE", *[f"--model.{k}={v}" for k, v in TINY_MAE.items()],
    "--data.dataset", "synthetic", "--data.synthetic_size", "12", "--data.val_fraction", "0",
    "--data.batch_size", "4", "--data.num_workers", "0", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--seed_everything", "0",
]


@pytest.mark.slow
def test_sigterm_leaves_loadable_last_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ssl_kit", "fit", *FIT_ARGS, "--trainer.max_epochs", "1000",
           "--trainer.default_root_dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while not (run_dir / "epoch=0000.ckpt").exists():  # training is under way
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    step = load_checkpoint(run_dir / "last.ckpt")["global_step"]
    assert step >= 3 and not list(run_dir.glob(".*.tmp-*"))
    done = run_cli("fit", *FIT_ARGS, "--trainer.max_epochs", str(step // 3 + 2),
                   "--trainer.default_root_dir", str(run_dir), "--ckpt_path", "last")
    assert_ok(done)
    assert f"resuming from {run_dir / 'last.ckpt'}" in done.stdout
    assert load_checkpoint(run_dir / "last.ckpt")["global_step"] == 3 * (step // 3 + 2)


# --- 4. atomic checkpoints -------------------------------------------------------------------
def _partial_save(obj, f):
    f.write(b"PK\x03\x04 partial checkpoint bytes")
    f.flush()


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def failing_save(obj, f):
        _partial_save(obj, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left


def _killed_while_saving(path: str) -> None:
    def dying_save(obj, f):
        _partial_save(obj, f)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    SafeCheckpointIO().save_checkpoint({"step": 2}, path)


def test_process_killed_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"step": 1}, path)
    child = multiprocessing.get_context("fork").Process(target=_killed_while_saving, args=(str(path),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1


# --- 5. NaN / Inf guard ----------------------------------------------------------------------
class NaNMAE(MAE):
    """MAE whose loss is NaN at the given global steps."""

    def __init__(self, nan_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_steps = set(nan_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


class WeightWatch(pl.Callback):
    """Records, per global step, whether the step changed the weights."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = list(pl_module.parameters())
        assert all(torch.isfinite(p).all() for p in after)
        self.changed[trainer.global_step - 1] = any(not torch.equal(a, b) for a, b in zip(self._before, after))


def test_nan_step_is_skipped_and_weights_untouched(tmp_path):
    torch.manual_seed(0)
    watch, guard = WeightWatch(), NaNGuard(max_consecutive=2)
    with pytest.warns(UserWarning, match="global step 2: step skipped"):
        trainer(tmp_path, [guard, watch]).fit(
            NaNMAE(nan_steps=(2,), **TINY_MAE), SSLDataModule(**DATA))
    assert watch.changed == {0: True, 1: True, 2: False, 3: True, 4: True, 5: True}
    assert guard.skipped == 1 and guard.consecutive == 0


class InfGradMAE(MAE):
    """MAE with a finite loss whose gradient gets an Inf entry at the given global steps."""

    def __init__(self, inf_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.inf_steps, self.losses = set(inf_steps), {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.losses[self.global_step] = loss.item()
        return loss

    def on_after_backward(self) -> None:
        if self.global_step in self.inf_steps:
            self.decoder.pred.weight.grad[0, 0] = float("inf")


class OptimizerWatch(pl.Callback):
    """Records, per global step, whether the step changed the optimizer state (Adam moments, step counts)."""

    def __init__(self) -> None:
        self.changed: dict[int, bool] = {}

    @staticmethod
    def _state(trainer) -> list[torch.Tensor]:
        state = trainer.optimizers[0].state
        return [v.clone() for p in state for v in state[p].values() if isinstance(v, torch.Tensor)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._before = self._state(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        after = self._state(trainer)
        self.changed[trainer.global_step - 1] = len(after) != len(self._before) or any(
            not torch.equal(a, b) for a, b in zip(self._before, after))


def test_inf_gradient_step_is_skipped_leaving_weights_and_optimizer_state(tmp_path):
    """A finite loss with an Inf gradient: the step is skipped, the weights AND AdamW's state
    (exp_avg, exp_avg_sq, step) are exactly as before; the steps around it train normally."""
    torch.manual_seed(0)
    weights, state, guard = WeightWatch(), OptimizerWatch(), NaNGuard(max_consecutive=2)
    model = InfGradMAE(inf_steps=(1,), **TINY_MAE)
    with pytest.warns(UserWarning, match="global step 1: step skipped"):
        trainer(tmp_path, [guard, weights, state], max_epochs=1).fit(model, SSLDataModule(**DATA))
    assert all(math.isfinite(loss) for loss in model.losses.values()) and 1 in model.losses
    assert weights.changed == {0: True, 1: False, 2: True}
    assert state.changed == {0: True, 1: False, 2: True}
    assert guard.skipped == 1


def test_consecutive_nan_steps_stop_naming_step_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    t = trainer(tmp_path, [RunCheckpoint(str(tmp_path)), NaNGuard(max_consecutive=2)])
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .* global step 4.*last\.ckpt"):
        t.fit(NaNMAE(nan_steps=(3, 4), **TINY_MAE), SSLDataModule(**DATA))
    assert torch.isfinite(load_checkpoint(tmp_path / "last.ckpt")["state_dict"]["encoder.cls_token"]).all()


DDP_SCRIPT = """
import json, sys, torch, pytorch_lightning as pl
sys.path.insert(0, {tests!r})
from test_reliability import DATA, NaNMAE, WeightWatch
from conftest import TINY_MAE
from ssl_kit.callbacks import NaNGuard, NonFiniteLossError
from ssl_kit.data import SSLDataModule

class RankNaN(NaNMAE):  # non-finite on one rank only: rank 1 at step 1, rank 0 at steps 3 and 4
    def training_step(self, batch, batch_idx):
        self.nan_steps = {{1}} if self.global_rank == 1 else {{3, 4}}
        return super().training_step(batch, batch_idx)

torch.manual_seed(0)
watch, guard = WeightWatch(), NaNGuard(max_consecutive=2)
trainer = pl.Trainer(max_epochs=5, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, callbacks=[guard, watch])
try:
    trainer.fit(RankNaN(**TINY_MAE), SSLDataModule(**{{**DATA, "batch_size": 2}}))
    error = ""
except NonFiniteLossError as err:
    error = str(err)
json.dump({{"changed": watch.changed, "error": error}}, open(f"{{sys.argv[1]}}/rank{{trainer.global_rank}}.json", "w"))
"""


@pytest.mark.slow
def test_nan_guard_ddp_ranks_agree(tmp_path):
    import json

    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # a hang would time out
    assert_ok(proc)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # every rank skipped the steps where any rank was non-finite, then stopped
        assert rank["changed"] == {"0": True, "1": False, "2": True, "3": False}  # step 4 raised
        assert re.search(r"2 consecutive .* global step 4", rank["error"])


# --- 7. safe loading -------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "last.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Payload(str(marker))}, f)
    with pytest.raises(ValueError, match="refusing to load .*weights_only=True"):
        SafeCheckpointIO().load_checkpoint(path, weights_only=False)  # no unsafe fallback, whatever is asked
    torch.manual_seed(0)
    t = trainer(tmp_path / "run", [RunCheckpoint(str(tmp_path / "run"))])
    with pytest.raises(ValueError, match="refusing to load"):  # Lightning's own resume goes through it too
        t.fit(MAE(**TINY_MAE), SSLDataModule(**DATA), ckpt_path=str(path))
    assert not marker.exists()


def _load_with(loader: str, path: Path, tmp_path: Path) -> None:
    """Feed ``path`` to one of ssl_kit's loaders."""
    if loader == "load_checkpoint":
        load_checkpoint(path)
    elif loader == "load_encoder":
        from ssl_kit.checkpoints import load_encoder

        load_encoder(str(path))
    elif loader == "export":
        from ssl_kit.export import export

        export(str(path), str(tmp_path / "out.safetensors"))
    elif loader == "read_state_dict":
        from ssl_kit.checkpoints import read_state_dict

        read_state_dict(path)
    elif loader.startswith("teacher"):
        import json

        from test_eva import TINY_CLIP

        from ssl_kit.backbones.teacher import FrozenTeacher, TeacherConfig

        if loader == "teacher-open_clip":
            (tmp_path / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
            FrozenTeacher(TeacherConfig("open_clip", str(tmp_path / "tiny-clip.json"), checkpoint=str(path)))
        else:
            FrozenTeacher(TeacherConfig("encoder", checkpoint=str(path)))
    elif loader == "SafeCheckpointIO":
        SafeCheckpointIO().load_checkpoint(path)
    else:
        raise AssertionError(loader)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("loader, suffix", [
    ("load_checkpoint", ".ckpt"), ("load_encoder", ".ckpt"), ("load_encoder", ".pth"), ("export", ".ckpt"),
    ("read_state_dict", ".bin"), ("teacher-open_clip", ".bin"), ("teacher-encoder", ".ckpt"),
    ("SafeCheckpointIO", ".ckpt"),
])
def test_every_loader_refuses_a_pickle_that_runs_code(tmp_path, loader, suffix, writer):
    """A checkpoint-shaped file whose unpickling would run a command (touch a marker file) is
    refused by every loader, and the command never runs."""
    marker, path = tmp_path / "pwned", tmp_path / f"evil{suffix}"
    payload = {"state_dict": {"encoder.w": torch.zeros(1)}, "model": {}, "payload": Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises((ValueError, pickle.UnpicklingError)) as error:
        _load_with(loader, path, tmp_path)
    assert not marker.exists(), f"{loader} ran the pickled command"
    assert path.name in str(error.value) or "weights_only" in str(error.value)
    with open(path, "rb") as f:  # the payload is real: unpickled unsafely, it runs
        torch.load(f, weights_only=False) if writer == "torch.save" else pickle.load(f)
    assert marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (REPO / "ssl_kit").rglob("*.py"):
        text = path.read_text()
        calls += [(path.name, m.group(0)) for m in re.finditer(r"torch\.load\([^)]*\)", text)]
    assert calls, "expected at least export.load_checkpoint"
    unsafe = [c for c in calls if "weights_only=True" not in c[1]]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"

"""Fault injection with real ``python -m ssl_kit fit`` processes: kill -9, moved and copied run
directories, corrupt checkpoints, concurrent fits, a full disk and bad images. Every test hashes
the run directory before the fault and checks that nothing already written was lost.

Faults are injected by ``tests/faults/sitecustomize.py`` (selected with ``SSL_KIT_FAULT``). The
module tallies trials and faults; ``test_fault_tally`` prints the totals.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from ssl_kit.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

FAULTS_DIR = REPO / "tests" / "faults"
STEPS_PER_EPOCH, EPOCHS = 4, 3  # 16 synthetic images, batch 4
FIT = [
    "fit", "--model", "ssl_kit.methods.MAE", "--model.model_name", "test_vit", "--model.img_size", "32",
    "--model.patch_size", "4", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
    "--model.decoder_num_heads", "2", "--model.warmup_epochs", "0", "--data.dataset", "synthetic",
    "--data.synthetic_size", "16", "--data.val_fraction", "0", "--data.batch_size", "4", "--data.num_workers", "0",
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.deterministic", "true", "--seed_everything", "0",
    "--checkpoint.every_n_train_steps", "1",
]
#: Not data: the lock is consumed by the next holder, temporary files by the next locked start.
TRANSIENT = re.compile(r"(^|/)(\.ssl_kit\.lock|\.[^/]*\.tmp-\d+)$")
TALLY = {"trials": 0, "faults_survived": 0, "bytes_lost": 0, "processes": 0}


def start(*args: str, run_dir: Path, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{FAULTS_DIR}{os.pathsep}{REPO}", PYTHONUNBUFFERED="1")
    env.pop("SSL_KIT_FAULT", None)
    if fault:
        env["SSL_KIT_FAULT"] = fault
    TALLY["processes"] += 1
    return subprocess.Popen([sys.executable, "-m", "ssl_kit", *FIT, "--trainer.default_root_dir", str(run_dir), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, expect: int = 0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{out[-3000:]}\n{err[-5000:]}"
    return out, err


def snapshot(run_dir: Path) -> dict:
    """relative path -> (size, sha256) of every file that holds data, and the step of last.ckpt."""
    files = sorted(p for p in run_dir.rglob("*") if p.is_file())
    hashes = {str(p.relative_to(run_dir)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
              for p in files if not TRANSIENT.search(str(p.relative_to(run_dir)))}
    try:
        step = load_checkpoint(run_dir / "last.ckpt")["global_step"]
    except Exception:  # missing or corrupt (the test corrupted it)
        step = -1
    return {"files": hashes, "last_step": step}


def assert_nothing_lost(before: dict, run_dir: Path, may_advance: tuple[str, ...] = ("last.ckpt",)) -> None:
    """Every file in ``before`` is still there byte for byte (under its name or, if it was refused
    as corrupt, as ``NAME.corrupt``), except ``may_advance`` files, which must now hold a good
    checkpoint at least as new. Adds the bytes of anything else to the tally and fails."""
    after, lost = snapshot(run_dir)["files"], []
    kept_hashes = {digest for _, digest in after.values()}
    for name, (size, digest) in before["files"].items():
        if digest in kept_hashes:
            continue
        if name in may_advance and (run_dir / name).is_file():
            if load_checkpoint(run_dir / name)["global_step"] >= before["last_step"]:  # verified on load
                continue
        lost.append((name, size))
    TALLY["bytes_lost"] += sum(size for _, size in lost)
    assert not lost, f"lost or changed: {lost}"


def last_step(run_dir: Path) -> int:
    return load_checkpoint(run_dir / "last.ckpt")["global_step"]


def assert_no_versioned_copies(run_dir: Path) -> None:
    assert not list(run_dir.glob("last-v*")) and not list(run_dir.glob("*-v[0-9]*.ckpt")), sorted(os.listdir(run_dir))


class Reference:
    """One uninterrupted run, started in the background and shared by the tests of this module."""

    def __init__(self, run_dir: Path) -> None:
        self.dir, self._proc, self._done = run_dir, start("--trainer.max_epochs", str(EPOCHS), run_dir=run_dir), False

    def wait(self) -> Path:
        if not self._done:
            finish(self._proc)
            self._done = True
        return self.dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference") / "run")


def copy_of_reference(reference: Reference, dest: Path) -> Path:
    shutil.copytree(reference.wait(), dest)
    return dest


# --- kill -9 at random steps, in a moved and then a copied directory -----------------------------
def test_kill9_at_random_steps_resumes_exactly_in_moved_and_copied_dirs(reference, tmp_path):
    rng = random.Random(int(os.environ.get("SSL_KIT_FAULT_SEED", "13")))
    k1 = rng.randint(1, 4)
    k2 = rng.randint(k1 + 2, 7)
    k3 = rng.randint(k2 + 1, 10)
    total = EPOCHS * STEPS_PER_EPOCH
    a, b, c = tmp_path / "a", tmp_path / "moved" / "b", tmp_path / "copied" / "c"

    finish(start("--trainer.max_epochs", str(EPOCHS), run_dir=a, fault=f"kill_after_save:{k1}"), -signal.SIGKILL)
    assert last_step(a) == k1
    b.parent.mkdir()
    a.rename(b)  # the run directory moves (another mount point, a scratch copy, ...)
    before = snapshot(b)
    out, _ = finish(start("--trainer.max_epochs", str(EPOCHS), "--ckpt_path", "last", run_dir=b,
                          fault=f"kill_in_save:{k2}"), -signal.SIGKILL)
    assert f"resuming from {b / 'last.ckpt'} at global step {k1}" in out and "stale lock taken over" in out
    assert last_step(b) == k2 - 1  # killed while writing step k2: the step before is intact
    assert_nothing_lost(before, b)
    assert_no_versioned_copies(b)

    shutil.copytree(b, c)  # ... and is copied (container vs host)
    before = snapshot(c)
    out, _ = finish(start("--trainer.max_epochs", str(EPOCHS), "--ckpt_path", "last", run_dir=c,
                          fault=f"kill_after_save:{k3}"), -signal.SIGKILL)
    # At an epoch's end, epoch=NNNN.ckpt is written just before last.ckpt: the newest good one.
    resumed_at = k2 if k2 % STEPS_PER_EPOCH == 0 else k2 - 1
    assert f"at global step {resumed_at}" in out and "removed 1 unfinished temporary file" in out
    assert last_step(c) == k3
    assert_nothing_lost(before, c)

    before = snapshot(c)
    out, _ = finish(start("--trainer.max_epochs", str(EPOCHS), "--ckpt_path", "last", run_dir=c))
    assert f"at global step {k3}" in out
    assert_nothing_lost(before, c)
    assert_no_versioned_copies(c)
    configs = sorted(p.name for p in c.glob("config*.yaml"))
    assert configs == sorted(["config.yaml", *(f"config.step={s:06d}.yaml" for s in (k1, resumed_at, k3))]), configs

    ours, ref = load_checkpoint(c / "last.ckpt"), load_checkpoint(reference.wait() / "last.ckpt")
    assert ours["global_step"] == ref["global_step"] == total
    for key, value in ref["state_dict"].items():  # bit-identical to the run that was never interrupted
        assert torch.equal(ours["state_dict"][key], value), key
    for i, (x, y) in enumerate(zip(ours["optimizer_states"][0]["state"].values(),
                                   ref["optimizer_states"][0]["state"].values())):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"]), i
    TALLY["trials"] += 3
    TALLY["faults_survived"] += 3 + 2  # three kills, a move and a copy


# --- truncated and bit-flipped checkpoints -------------------------------------------------------
def flip_bits_in_tensor(path: Path, name: str = "encoder.blocks.0.attn.qkv.weight", n: int = 4096) -> None:
    """Invert 4 KiB inside one weight's bytes where they lie in the file, as a bad disk block would."""
    needle = load_checkpoint(path)["state_dict"][name].contiguous().numpy().tobytes()[:64]
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def test_truncated_and_bit_flipped_checkpoints_are_refused_naming_the_file(reference, tmp_path):
    run, other = copy_of_reference(reference, tmp_path / "run"), copy_of_reference(reference, tmp_path / "other")
    last, newest_epoch = run / "last.ckpt", run / f"epoch={EPOCHS - 1:04d}.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated (a crash during a copy)
    flip_bits_in_tensor(newest_epoch)
    flip_bits_in_tensor(other / "last.ckpt")
    before = snapshot(run)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    export = subprocess.Popen([sys.executable, "-m", "ssl_kit", "export", str(other / "last.ckpt"), "--output",
                               str(tmp_path / "enc.safetensors")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    TALLY["processes"] += 1
    resume = start("--trainer.max_epochs", str(EPOCHS + 1), "--ckpt_path", "last", run_dir=run)

    _, err = finish(export, expect=2)
    line = err.strip().splitlines()[-1]
    assert re.search(rf"error: {re.escape(str(other / 'last.ckpt'))} is corrupt: tensor '[^']+' differs", line), err
    assert f"The newest good checkpoint beside it is {other / f'epoch={EPOCHS - 1:04d}.ckpt'}" in line
    assert "Traceback" not in err and not (tmp_path / "enc.safetensors").exists()

    out, _ = finish(resume)
    good = (EPOCHS - 1) * STEPS_PER_EPOCH
    assert "last.ckpt is unusable (is truncated or not a checkpoint" in out and "kept as last.ckpt.corrupt" in out
    assert f"{newest_epoch.name} is unusable (is corrupt: tensor" in out
    assert f"resuming from {run / f'epoch={EPOCHS - 2:04d}.ckpt'} at global step {good} (the newest good" in out
    assert last_step(run) == (EPOCHS + 1) * STEPS_PER_EPOCH
    assert_nothing_lost(before, run)  # the corrupt files are kept as *.corrupt, byte for byte
    assert load_checkpoint(newest_epoch)["global_step"] == EPOCHS * STEPS_PER_EPOCH  # written anew, good
    TALLY["trials"] += 3
    TALLY["faults_survived"] += 3  # truncated last.ckpt, flipped epoch file (resume), flipped last.ckpt (export)


# --- two fits into one root at once (one of them DDP) --------------------------------------------
def test_concurrent_fits_never_share_a_directory(tmp_path):
    root = tmp_path / "runs" / "mae"
    ddp = start("--trainer.max_epochs", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp", run_dir=root)
    single = start("--trainer.max_epochs", "1", run_dir=root)
    (ddp_out, _), (single_out, _) = finish(ddp), finish(single)
    dirs = sorted(p.name for p in root.parent.iterdir())
    assert dirs == ["mae", "mae-1"], dirs
    used = {re.findall(r"run directory: (\S+)", out)[-1] for out in (ddp_out, single_out)}
    assert used == {str(root), str(root.parent / "mae-1")}
    ranks = re.findall(r"run directory: (\S+)", ddp_out)
    assert len(ranks) == 2 and len(set(ranks)) == 1, ranks  # both DDP ranks in one directory
    # The second to claim found the first's lock (or, if it came late, its checkpoints) and moved on.
    assert "is in use by another fit (pid" in ddp_out + single_out or "already holds checkpoints" in ddp_out + single_out
    steps = sorted(last_step(root.parent / d) for d in dirs)
    assert steps == [STEPS_PER_EPOCH // 2, STEPS_PER_EPOCH]  # 2 ranks x batch 4 vs 1 x 4
    assert not list(root.parent.rglob(".ssl_kit.lock"))  # released by both
    TALLY["trials"] += 1
    TALLY["faults_survived"] += 1


# --- the disk fills up while a checkpoint is written ----------------------------------------------
def test_disk_full_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    run = copy_of_reference(reference, tmp_path / "run")
    before = snapshot(run)
    first_new = EPOCHS * STEPS_PER_EPOCH + 1
    _, err = finish(start("--trainer.max_epochs", str(EPOCHS + 1), "--ckpt_path", "last", run_dir=run,
                          fault=f"enospc_in_save:{first_new}"), expect=2)
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on the device writing {run / 'last.ckpt'}") and "intact" in line
    assert "Traceback" not in err
    assert_nothing_lost(before, run, may_advance=())  # last.ckpt untouched, byte for byte
    assert last_step(run) == EPOCHS * STEPS_PER_EPOCH and not list(run.glob(".*.tmp-*"))
    TALLY["trials"] += 1
    TALLY["faults_survived"] += 1


# --- unreadable images under both policies -------------------------------------------------------
def write_image_folder(root: Path) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
    (root / "truncated.jpg").write_bytes((root / "img00.png").read_bytes()[:100])
    (root / "empty.png").write_bytes(b"")
    return root


def test_bad_images_skip_then_error_policy(tmp_path):
    images, run = write_image_folder(tmp_path / "images"), tmp_path / "run"
    folder = ["--data.dataset", "folder", "--data.root", str(images), "--data.batch_size", "2"]
    out, err = finish(start(*folder, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "true",
                            run_dir=run))
    assert "global batch 2 -> lr" in out  # printed with the progress bar on, too
    assert "skipping unreadable image" in err and "truncated.jpg" in err and "empty.png" in err
    assert last_step(run) == 7  # 14 files, batch 2: the unreadable ones replaced by readable ones

    before = snapshot(run)
    _, err = finish(start(*folder, "--data.bad_images", "error", "--data.num_workers", "1", "--trainer.max_epochs",
                          "2", "--ckpt_path", "last", run_dir=run), expect=2)
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: cannot read image '.*(truncated\.jpg|empty\.png)': .*bad_images='error'.*", line), line
    assert "Traceback" not in err
    assert_nothing_lost(before, run)
    TALLY["trials"] += 2
    TALLY["faults_survived"] += 2


def test_fault_tally():
    """Totals of this module's fault injection (run with -s to see them)."""
    print(f"\nfault injection: {TALLY['trials']} trials, {TALLY['faults_survived']} faults survived, "
          f"{TALLY['bytes_lost']} bytes lost, {TALLY['processes']} ssl_kit processes")
    assert TALLY["bytes_lost"] == 0

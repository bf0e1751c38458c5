"""The run-directory lock: concurrent fits never share a directory, a killed holder's lock is stale,
every rank of a launch agrees on the directory; config.yaml describes the checkpoints beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from ssl_kit.errors import RunDirBusyError
from ssl_kit.run_lock import DECISION_ENV, LOCK_NAME, RunLock, claim_run_dir, release_claims


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_RUN_ID", "RANK", DECISION_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    release_claims()


def test_a_busy_directory_sends_a_fresh_run_to_the_next_one_and_refuses_a_resume(tmp_path, capsys):
    root = tmp_path / "mae"
    first = claim_run_dir(root, None)
    assert first.run_dir == root and (root / LOCK_NAME).is_file()
    second = claim_run_dir(root, None)  # its own open file description: flock conflicts as across processes
    assert second.run_dir == tmp_path / "mae-1"
    assert f"{root} is in use by another fit (pid {os.getpid()}" in capsys.readouterr().out
    with pytest.raises(RunDirBusyError, match=rf"{root} is in use by another fit \(pid {os.getpid()} on "):
        claim_run_dir(root, "last")
    first.release()
    second.release()
    assert not root.exists() and not (tmp_path / "mae-1").exists()  # nothing was written: nothing is left


def test_the_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path, capsys):
    root = tmp_path / "run"
    code = ("import os, signal, sys; sys.path.insert(0, sys.argv[2]); from ssl_kit.run_lock import RunLock; "
            "from pathlib import Path; RunLock(Path(sys.argv[1])).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", code, str(root), str(REPO)], timeout=120)
    assert child.returncode == -9 and json.loads((root / LOCK_NAME).read_text())["pid"] > 0
    (root / ".last.ckpt.tmp-99999").write_bytes(b"partial")  # an atomic write the kill interrupted
    claim = claim_run_dir(root, None)
    out = capsys.readouterr().out
    assert claim.run_dir == root and "which no longer runs: stale lock taken over" in out
    assert "removed 1 unfinished temporary file(s)" in out and not (root / ".last.ckpt.tmp-99999").exists()


def test_a_live_lock_holder_in_another_process_is_respected(tmp_path):
    root = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[2]); "
                               "from ssl_kit.run_lock import RunLock; from pathlib import Path; "
                               "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)",
                               str(root), str(REPO)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not RunLock(root).acquire()
        with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
            claim_run_dir(root, "last_if_exists")
    finally:
        holder.kill()
        holder.wait()
    assert RunLock(root).acquire()  # the kernel dropped the dead holder's lock


RANK_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from ssl_kit.run_lock import claim_run_dir, release_claims
claim = claim_run_dir(Path(sys.argv[1]), None)
print(json.dumps({"run_dir": str(claim.run_dir), "ckpt_path": claim.ckpt_path, "locked": claim.lock is not None}))
sys.stdout.flush()
sys.stdin.read()  # rank 0 holds the lock until the test lets go
release_claims()
"""


def test_ranks_started_by_torchrun_agree_on_the_directory(tmp_path):
    root = tmp_path / "mae"
    root.mkdir()
    torch.save({}, root / "last.ckpt")  # an earlier run: a fresh one goes to mae-1
    env = dict(os.environ, TORCHELASTIC_RUN_ID="none", TORCHELASTIC_RESTART_COUNT="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29555", SSL_KIT_RANK_WAIT_S="120")
    # A killed launch with the same id (torchrun without --rdzv-id) left its record: not to be trusted.
    stale = {"launch": "torchrun:none@127.0.0.1:29555:0", "ready": True, "run_dir": str(tmp_path / "old"),
             "ckpt_path": None, "pid": 1}
    (root / LOCK_NAME).write_text(json.dumps(stale))
    ranks = []
    for rank in (1, 0):  # rank 1 first: it must wait for rank 0's decision, not make its own
        ranks.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(root), str(REPO)],
                                      env={**env, "RANK": str(rank)}, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    outs = [json.loads(next(line for line in p.stdout if line.startswith("{"))) for p in ranks]
    for p in ranks:
        p.communicate("", timeout=120)
    assert [o["run_dir"] for o in outs] == [str(tmp_path / "mae-1")] * 2
    assert [o["locked"] for o in outs] == [False, True]  # only rank 0 holds the lock
    assert not (tmp_path / "mae-2").exists()  # rank 1 made no directory of its own


def test_processes_started_by_the_ddp_launcher_inherit_the_decision(tmp_path):
    root = tmp_path / "run"
    claim = claim_run_dir(root, None)  # as rank 0 does before Lightning starts the other ranks
    code = ("import sys, json; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
            "from ssl_kit.run_lock import claim_run_dir; c = claim_run_dir(Path(sys.argv[1]), None); "
            "print(json.dumps([str(c.run_dir), c.lock is None]))")
    child = subprocess.run([sys.executable, "-c", code, str(root), str(REPO)], capture_output=True, text=True,
                           timeout=120)
    assert json.loads(child.stdout) == [str(claim.run_dir), True], child.stderr  # not root-1: rank 0's choice
    claim.release()
    assert DECISION_ENV not in os.environ


# --- config.yaml beside the checkpoints ------------------------------------------------------
TINY = [
    "fit", "--model", "ssl_kit.methods.MAE", "--model.model_name", "test_vit", "--model.img_size", "32",
    "--model.patch_size", "4", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
    "--model.decoder_num_heads", "2", "--data.dataset", "synthetic", "--data.synthetic_size", "12",
    "--data.val_fraction", "0", "--data.num_workers", "0", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
]


def test_config_is_written_when_training_starts_one_per_segment(tmp_path, capsys):
    from ssl_kit.cli import main

    run = tmp_path / "run"
    main([*TINY, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run)])
    assert (run / "config.yaml").read_text().startswith("# started at global step 0\n")
    with pytest.raises(SystemExit) as refused:  # a failed start (refused resume) writes no config
        main([*TINY, "--trainer.max_epochs", "2", "--data.batch_size", "2", "--ckpt_path", "last",
              "--trainer.default_root_dir", str(run)])
    assert refused.value.code == 2 and "batch_size 4 -> 2" in capsys.readouterr().err
    assert sorted(p.name for p in run.glob("config*")) == ["config.yaml"]
    main([*TINY, "--trainer.max_epochs", "2", "--ckpt_path", "last", "--trainer.default_root_dir", str(run)])
    segment = run / "config.step=000003.yaml"
    assert segment.read_text().startswith(f"# resumed at global step 3 from {run / 'last.ckpt'}\n")
    assert "max_epochs: 2" in segment.read_text() and "max_epochs: 1" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in run.glob("config*")) == ["config.step=000003.yaml", "config.yaml"]

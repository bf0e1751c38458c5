"""Which run directory a ``fit`` uses, and the lock that keeps two runs out of one directory.

* A fresh ``fit`` never shares a directory: it takes the first of ``root, root-1, root-2, ...``
  that holds no checkpoint and whose lock it gets (:class:`RunLock`), and says so; a resume locks
  ``root`` or is refused while another live process holds it.
* A lock left by a killed process is stale and is taken over (with a message naming it).
* Under DDP only the launching process decides: the processes Lightning's launcher starts
  inherit the decision, and ranks started by ``srun``/``torchrun`` read it from the lock of their
  launch, so every rank uses the same directory and checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ssl_kit.errors import RunDirBusyError
from ssl_kit.run_dir import has_checkpoints, resume_checkpoint, slurm_requeued, writable_dir

LOCK_NAME = ".ssl_kit.lock"
#: Environment variable carrying rank 0's decision to the processes Lightning's DDP launcher starts.
DECISION_ENV = "SSL_KIT_RUN_DECISION"
#: How long a rank started by srun/torchrun waits for rank 0 to claim the directory (seconds).
RANK_WAIT_S = float(os.environ.get("SSL_KIT_RANK_WAIT_S", 600))


# --- the lock ---------------------------------------------------------------------------------
class RunLock:
    """An exclusive claim on a run directory: the file ``.ssl_kit.lock``, held with ``flock``.

    The kernel drops an ``flock`` when its process dies (``kill -9`` included), so a lock left by
    a dead process is stale by construction: the next claimant gets it and says whose it was.
    The file records the holder (pid, host, start time, launch id) for messages and for the other
    ranks of a ``srun``/``torchrun`` launch. Where the file system has no ``flock``, a lock whose
    pid no longer runs on this host counts as stale.

    Examples:
        >>> lock = RunLock(Path("runs/mae"))
        >>> if lock.acquire(): ...; lock.release()  # doctest: +SKIP
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_NAME
        self.previous: dict | None = None  # a dead holder's record, when the lock was stale
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self, info: dict | None = None) -> bool:
        """Take the lock (True) or find it held by a live process (False)."""
        self._created_dir = not self.run_dir.exists()
        writable_dir(self.run_dir, "the run")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._lock(fd):
                os.close(fd)
                return False
            if _same_file(fd, self.path):  # not unlinked by its last holder between open and lock
                break
            os.close(fd)
        self._fd, self.previous = fd, self.holder()
        self.write(info or {})
        return True

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError:  # no flock on this file system: judge by the recorded pid
            holder = self.holder()
            return not holder or not _alive(holder)

    def write(self, info: dict) -> None:
        """Record the holder (and, for other ranks, the decision) in the lock file."""
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), **info})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data.encode(), 0)
        os.fsync(self._fd)

    def holder(self) -> dict | None:
        """The record in the lock file, if any (whoever holds or last held it)."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def is_held(self) -> bool:
        """Whether some live process holds the lock now (a record left by a killed one is not)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        except OSError:  # no flock here: trust the record
            return True
        finally:
            os.close(fd)

    def release(self) -> None:
        """Delete the lock file (while still holding it) and let go; an empty directory this
        lock created (a run refused before writing anything) is removed too."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created_dir:
            try:
                self.run_dir.rmdir()
            except OSError:  # not empty: the run wrote something
                pass


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _alive(holder: dict) -> bool:
    """Whether a recorded holder may still run (only a pid on this host can be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {started})"


# --- which directory --------------------------------------------------------------------------
@dataclass
class Claim:
    """The run directory and checkpoint of this process's ``fit``; ``lock`` is held by the
    process that decided (rank 0 or the single process), None in the others."""

    run_dir: Path
    ckpt_path: str | None
    lock: RunLock | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if _decision_owner() == os.getpid():
            os.environ.pop(DECISION_ENV, None)


_claims: list[Claim] = []


def release_claims() -> None:
    """Release every claim this process made (the CLI calls it when the job ends, however it ends)."""
    while _claims:
        _claims.pop().release()


def claim_run_dir(root: Path, ckpt_path: str | None) -> Claim:
    """Decide (rank 0) or learn (other ranks) the run directory and checkpoint of a ``fit``.

    Args:
        root: ``--trainer.default_root_dir``.
        ckpt_path: ``--ckpt_path`` (``last``, ``last_if_exists``, a file, or None for a fresh run).

    Raises:
        RunDirBusyError: resuming in ``root`` while another live process holds its lock.
    """
    inherited = _inherited_decision()
    if inherited is not None:  # started by Lightning's DDP launcher: rank 0 has decided
        return Claim(Path(inherited["run_dir"]), inherited["ckpt_path"])
    rank, launch = launch_info()
    if rank > 0 and launch is not None:  # started by srun / torchrun: read rank 0's decision
        info = wait_for_claim(Path(root), launch)
        return Claim(Path(info["run_dir"]), info["ckpt_path"])
    stays = ckpt_path is not None or slurm_requeued()
    claim = _claim_root(Path(root), ckpt_path, launch) if stays else _claim_fresh(Path(root), launch)
    decision = {"run_dir": str(claim.run_dir), "ckpt_path": claim.ckpt_path, "launch": launch, "ready": True}
    claim.lock.write(decision)
    os.environ[DECISION_ENV] = json.dumps({**decision, "pid": os.getpid()})
    _claims.append(claim)
    return claim


def _claim_root(root: Path, ckpt_path: str | None, launch: str | None) -> Claim:
    lock = RunLock(root)
    if not lock.acquire({"launch": launch}):
        raise RunDirBusyError(f"{root} is in use by another fit ({describe(lock.holder())}); wait for it to end, "
                              f"or choose another --trainer.default_root_dir.")
    _report_stale(lock)
    try:
        return Claim(root, resume_checkpoint(root, ckpt_path), lock)
    except BaseException:
        lock.release()
        raise


def _claim_fresh(root: Path, launch: str | None) -> Claim:
    """The first of ``root, root-1, ...`` without checkpoints whose lock this process gets."""
    candidate, n, skipped = root, 1, []
    while True:
        if has_checkpoints(candidate):
            skipped.append(f"{candidate} already holds checkpoints")
        else:
            lock = RunLock(candidate)
            if lock.acquire({"launch": launch}):
                if not has_checkpoints(candidate):  # checked again, now that no one else can start here
                    break
                lock.release()
                skipped.append(f"{candidate} already holds checkpoints")
            else:
                skipped.append(f"{candidate} is in use by another fit ({describe(lock.holder())})")
        candidate, n = root.with_name(f"{root.name}-{n}"), n + 1
    _report_stale(lock)
    if skipped:
        print(f"{'; '.join(skipped)}: starting a new run in {candidate} (to resume instead, pass --ckpt_path last)")
    return Claim(candidate, None, lock)


def _report_stale(lock: RunLock) -> None:
    """Say whose stale lock was taken over, and delete the unfinished temporary files of atomic
    writes in the directory: with the lock held, no one else is writing them."""
    if lock.previous:
        print(f"{lock.path} was left by {describe(lock.previous)}, which no longer runs: stale lock taken over")
    partial = [p for p in lock.run_dir.glob(".*.tmp-*") if p.is_file()]
    for path in partial:
        path.unlink(missing_ok=True)
    if partial:
        print(f"removed {len(partial)} unfinished temporary file(s) of an interrupted write: "
              f"{', '.join(p.name for p in partial)}")


def launch_info() -> tuple[int, str | None]:
    """(global rank, launch id) of a process started by torchrun or srun; ``(0, None)`` otherwise.

    Every process of one launch shares the id (a requeued or restarted launch gets a new one).
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:  # the id is "none" without --rdzv-id: the master address tells launches apart
        launch = f"{env['TORCHELASTIC_RUN_ID']}@{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
        return int(env.get("RANK", 0)), f"torchrun:{launch}:{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    if int(env.get("SLURM_NTASKS") or 1) > 1 and "SLURM_PROCID" in env:
        job = f"{env.get('SLURM_JOB_ID')}.{env.get('SLURM_STEP_ID', '')}"
        return int(env["SLURM_PROCID"]), f"slurm:{job}:{env.get('SLURM_RESTART_COUNT', 0)}"
    return 0, None


def wait_for_claim(root: Path, launch: str) -> dict:
    """The lock record rank 0 of ``launch`` wrote under ``root`` (or ``root-N``), once it is there."""
    deadline = time.monotonic() + RANK_WAIT_S
    while time.monotonic() < deadline:
        candidates, n = [root], 1
        while (sibling := root.with_name(f"{root.name}-{n}")).exists():
            candidates, n = candidates + [sibling], n + 1
        for candidate in candidates:
            lock = RunLock(candidate)
            holder = lock.holder()
            if holder and holder.get("launch") == launch and holder.get("ready") and lock.is_held():
                return holder
        time.sleep(0.2)
    raise RuntimeError(f"waited {RANK_WAIT_S:.0f} s for rank 0 of {launch} to claim a run directory under {root}; "
                       f"see rank 0's output for why it did not start.")


def _decision_owner() -> int | None:
    raw = os.environ.get(DECISION_ENV)
    return json.loads(raw).get("pid") if raw else None


def _inherited_decision() -> dict | None:
    """Rank 0's decision, when this process was started by it (Lightning's DDP launcher)."""
    raw = os.environ.get(DECISION_ENV)
    if not raw:
        return None
    decision = json.loads(raw)
    return decision if decision.get("pid") == os.getppid() else None

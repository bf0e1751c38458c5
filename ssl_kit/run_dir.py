"""The run directory: which checkpoint a resume starts from, and writable outputs.

* ``--ckpt_path last`` resumes from the newest checkpoint that loads and passes its checksums,
  whatever its name (``last.ckpt``, ``hpc_ckpt_N.ckpt``, ``epoch=NNNN.ckpt``), ranked by the
  global step stored inside it (:func:`ssl_kit.checkpoints.verified.newest_good_checkpoint`), so a
  moved or copied directory resumes where it stopped. Unusable files are renamed ``*.corrupt``
  (kept, never overwritten) and named.
* Every output path is proven writable by creating a file in it before any long work.

Which directory a ``fit`` uses, and its lock, are in :mod:`ssl_kit.run_lock`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ssl_kit.checkpoints.verified import newest_good_checkpoint, quarantine
from ssl_kit.errors import MissingFileError, UserError

#: ``--ckpt_path`` values that resume from the run directory.
RESUME_LAST, RESUME_IF_EXISTS = "last", "last_if_exists"
CHECKPOINT_SUFFIXES = (".ckpt",)


# --- writable outputs ------------------------------------------------------------------------
def writable_dir(path: Path, what: str, hint: str = "choose another path") -> Path:
    """Create ``path`` if needed and prove it writable by creating and deleting a file in it.

    ``os.access`` is not enough: it says yes to root on read-only or special file systems.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot create {what} in {str(path)!r} ({err.strerror or err}); {hint}.") from None
    return path


def writable_file(path: Path, what: str, hint: str = "choose another path") -> Path:
    """``path`` once its folder is proven writable (and an existing file there opens for writing)."""
    path = Path(path)
    writable_dir(path.parent, what, hint)
    if path.is_dir():
        raise UserError(f"cannot write {what} to {str(path)!r}: it is a directory; {hint}.")
    if path.exists():
        try:
            open(path, "ab").close()  # appends nothing: the file is unchanged
        except OSError as err:
            raise UserError(f"cannot write {what} to {str(path)!r} ({err.strerror or err}); {hint}.") from None
    return path


def resume_checkpoint(run_dir: Path, ckpt_path: str | None) -> str | None:
    """Resolve ``--ckpt_path`` for ``fit``: a file path, or None for a fresh start.

    ``last`` must find a good checkpoint (no silent fresh start); ``last_if_exists`` resumes if it
    can; a requeued SLURM job without ``--ckpt_path`` behaves like ``last_if_exists``. Checkpoints
    found unusable on the way (every unreadable one, and those newer than the one chosen that fail
    their checks) are renamed ``*.corrupt`` and named.
    """
    if ckpt_path is None and slurm_requeued():
        ckpt_path = RESUME_IF_EXISTS
    if ckpt_path not in (RESUME_LAST, RESUME_IF_EXISTS):
        return ckpt_path
    found, rejected = newest_good_checkpoint(run_dir) if Path(run_dir).is_dir() else (None, {})
    for path, why in rejected.items():
        why = why.removeprefix(str(path)).strip(" :.")
        print(f"{path.name} is unusable ({why}); kept as {quarantine(path).name}")
    if found is None and ckpt_path == RESUME_LAST:
        raise MissingFileError(f"--ckpt_path last: no good checkpoint (last.ckpt, hpc_ckpt_*.ckpt, epoch=*.ckpt) in "
                               f"{run_dir} to resume from. Check --trainer.default_root_dir, or pass --ckpt_path "
                               f"last_if_exists to start fresh when there is nothing to resume.")
    if found is None:
        print(f"--ckpt_path {ckpt_path}: no checkpoint in {run_dir}, starting fresh")
        return None
    newest = " (the newest good checkpoint)" if rejected else ""
    print(f"resuming from {found.path} at global step {found.step}{newest}")
    return str(found.path)


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (SLURM sets ``SLURM_RESTART_COUNT`` >= 1)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def has_checkpoints(path: Path) -> bool:
    return path.is_dir() and any(p.suffix in CHECKPOINT_SUFFIXES for p in path.iterdir())


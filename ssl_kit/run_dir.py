"""The run directory's checkpoints: which one a resume starts from, and writable outputs.

* ``--ckpt_path last`` resumes from the newest checkpoint that loads and passes its checksums,
  whatever its name (``last.ckpt``, ``hpc_ckpt_N.ckpt``, ``epoch=NNNN.ckpt``), ranked by the
  global step stored inside it, so a moved or copied directory resumes where it stopped.
  Unusable files are renamed ``*.corrupt`` (kept, never overwritten) and named.
* Every output path is proven writable by creating a file in it before any long work.

Which directory a ``fit`` uses, and its lock, are in :mod:`ssl_kit.run_lock`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


# --- the newest good checkpoint --------------------------------------------------------------
@dataclass
class Candidate:
    """A checkpoint file in a run directory and the global step stored inside it."""

    path: Path
    step: int
    mtime_ns: int = 0


def ranked_checkpoints(run_dir: Path) -> tuple[list[Candidate], dict[Path, str]]:
    """Checkpoints whose header reads, newest (highest global step, then latest written) first,
    and the unreadable ones with the reason. Tensors are memory-mapped, not read."""
    from ssl_kit.export import read_checkpoint  # lazy: export imports this module

    ranked, unreadable = [], {}
    for path in sorted(Path(run_dir).glob("*.ckpt")):
        try:
            ckpt = read_checkpoint(path, mmap=True)
            step = int(ckpt.get("global_step", -1)) if isinstance(ckpt, dict) else -1
        except (UserError, OSError) as err:
            unreadable[path] = str(err)
            continue
        ranked.append(Candidate(path, step, path.stat().st_mtime_ns))
    ranked.sort(key=lambda c: (c.step, c.mtime_ns, c.path.name == "last.ckpt"), reverse=True)
    return ranked, unreadable


_hinting = False  # True while checkpoints are being ranked: no hint for each rejected one


def newest_good_checkpoint(run_dir: Path, exclude: Path | None = None) -> tuple[Candidate | None, dict[Path, str]]:
    """The newest checkpoint that loads, passes its checksums and has finite weights, and every
    file found unusable on the way (path -> why)."""
    from ssl_kit.export import load_checkpoint

    global _hinting
    ranked, rejected = ranked_checkpoints(run_dir)
    hinting, _hinting = _hinting, True  # a rejected file's error need not look for alternatives
    try:
        for candidate in ranked:
            if exclude is not None and candidate.path == exclude:
                continue
            try:
                load_checkpoint(candidate.path, mmap=True)
                return candidate, rejected
            except UserError as err:
                rejected[candidate.path] = str(err)
    finally:
        _hinting = hinting
    return None, rejected


def newest_checkpoint(run_dir: Path) -> Path | None:
    """Path of the newest good checkpoint in ``run_dir`` (see :func:`newest_good_checkpoint`)."""
    found, _ = newest_good_checkpoint(run_dir)
    return found.path if found else None


def alternative_hint(path: Path) -> str:
    """`` The newest good checkpoint beside it is X (global step N).`` for a corrupt ``path``."""
    if _hinting:
        return ""
    found, _ = newest_good_checkpoint(path.parent, exclude=path)
    if found is None:
        return f" No good checkpoint beside it in {path.parent}."
    return f" The newest good checkpoint beside it is {found.path} (global step {found.step})."


def quarantine(path: Path) -> Path:
    """Rename an unusable checkpoint to ``NAME.corrupt`` (``.corrupt-1``, ...) so no save overwrites it."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{n}"), n + 1
    path.rename(target)
    return target


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


"""Verified checkpoint loading, and the newest good checkpoint of a run directory.

* :func:`load_checkpoint` is every load of a training checkpoint (resume, ``export``,
  ``load_encoder``, the k-NN job): ``weights_only=True``, per-tensor checksums, finite weights.
* ``--ckpt_path last`` resumes from the newest checkpoint that loads and passes its checksums,
  whatever its name (``last.ckpt``, ``hpc_ckpt_N.ckpt``, ``epoch=NNNN.ckpt``), ranked by the global
  step stored inside it (:func:`newest_good_checkpoint`). Unusable files are renamed ``*.corrupt``
  (:func:`quarantine`), never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_kit.checkpoints.files import read_checkpoint
from ssl_kit.checkpoints.integrity import CHECKSUM_KEY, check_finite, verify
from ssl_kit.errors import CorruptCheckpointError, MissingFileError, UserError

#: (path, inode, size, mtime) of files verified in this process: a resume reads its checkpoint twice.
_VERIFIED: set[tuple] = set()


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint safely and check it is intact.

    ``weights_only=True`` (no code in the file can run); every tensor is checked against the
    checksums recorded when it was written, and the model weights must be finite. A file that
    passed these checks in this process and has not changed since is not hashed again.

    Args:
        path: the checkpoint file.
        mmap: map tensors from the file instead of reading them (cheap for large files).

    Raises:
        MissingFileError: no such file.
        UserError: the file needs arbitrary unpickling (e.g. it carries code).
        CorruptCheckpointError: truncated, failing its checksums or holding non-finite weights; the
            message names the file and the newest good checkpoint beside it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist.")
    try:
        ckpt = read_checkpoint(path, mmap)
        key = _file_key(path)
        if not isinstance(ckpt, dict):
            return ckpt
        if key in _VERIFIED:
            ckpt.pop(CHECKSUM_KEY, None)
        else:
            verify(ckpt, str(path))
            if isinstance(ckpt.get("state_dict"), dict):
                check_finite(ckpt["state_dict"], str(path))
            _VERIFIED.add(key)
        return ckpt
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{err}.{alternative_hint(path)}") from None


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


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

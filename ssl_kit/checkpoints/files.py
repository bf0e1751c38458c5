"""Reading and writing weight files: safe reads (``weights_only=True``) and atomic writes.

Every file ssl_kit writes that must survive a crash (checkpoints, exports) goes through
:func:`atomic_write`: a temporary file in the same directory, ``fsync``, ``os.replace``, then an
``fsync`` of the directory, so a process killed at any moment leaves the previous file or the
complete new one, never a partial file. Every weight file ssl_kit reads goes through
:func:`read_checkpoint` (``torch.load(weights_only=True)``, no unsafe fallback), :func:`read_safetensors`
or :func:`read_state_dict`; nothing is ever instantiated from a class named in a file.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import Tensor

from ssl_kit.errors import CorruptCheckpointError, MissingFileError, NoSpaceError, UserError

#: Harmless non-tensor objects found in official training checkpoints (their ``args``).
SAFE_GLOBALS = [argparse.Namespace]


# --- writing --------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, fsync, then rename.

    A full disk (or quota) raises :class:`NoSpaceError` after the partial temporary file is
    removed; any other failure removes it too and propagates.

    Examples:
        >>> atomic_write("runs/x/last.ckpt", lambda f: torch.save({"w": torch.ones(1)}, f))  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _out_of_space(err):
            kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
            raise NoSpaceError(f"no space left on the device writing {path}; {kept}. Free space, "
                               f"then resume with --ckpt_path last.") from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # make the rename itself durable
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """A ``.safetensors`` file written through :func:`atomic_write`."""
    from safetensors.torch import save

    return atomic_write(path, lambda f: f.write(save(tensors, metadata=metadata)))


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` is (or was raised while handling) ENOSPC / EDQUOT; torch's zip writer turns
    the file's OSError into a RuntimeError whose context is the original."""
    for _ in range(8):
        if err is None:
            return False
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


# --- reading --------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file.

    Raises:
        UserError: the file needs arbitrary unpickling (e.g. it carries code).
        CorruptCheckpointError: truncated, overwritten or not a torch file.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not (mmap and "mmap can only be used" in str(err)):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CorruptCheckpointError(f"{path} is corrupt ({first_line(err)})") from None
        raise UserError(f"refusing to load {str(path)!r}: it is not a plain-tensor checkpoint that loads with "
                        f"weights_only=True ({type(err).__name__}: {first_line(err)}).") from None
    except Exception as err:  # zip reader, EOF, bad magic number: a truncated or overwritten file
        raise CorruptCheckpointError(f"{path} is truncated or not a checkpoint "
                                     f"({type(err).__name__}: {first_line(err)})") from None


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of a ``.safetensors`` file; a damaged header is a :class:`CorruptCheckpointError`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except Exception as err:  # safetensors raises its own types for a truncated or overwritten header
        raise CorruptCheckpointError(f"{path} is truncated or not a safetensors file ({type(err).__name__}: "
                                     f"{str(err).strip()[:200]})") from None


def read_state_dict(path: str | os.PathLike, what: str = "weights") -> dict[str, Tensor]:
    """A plain tensor state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``),
    unwrapped from ``state_dict`` / ``model`` entries, ``module.`` prefixes removed (DDP saves).

    Args:
        path: the file.
        what: how error messages name the file (e.g. ``teacher.checkpoint='x.bin'``).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{what}: {str(path)!r} is not a file.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[1]
    try:
        state = read_checkpoint(path)
    except CorruptCheckpointError:
        raise
    except UserError as err:
        raise UserError(f"{what} is not a plain tensor state dict that loads with weights_only=True "
                        f"(TorchScript archives such as OpenAI's .pt are not: save model.state_dict() "
                        f"instead). {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{what} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["no details"])[0]

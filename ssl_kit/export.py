"""Export a trained encoder as a timm-loadable ``.safetensors`` file."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ssl_kit.errors import CorruptCheckpointError, MissingFileError, UserError
from ssl_kit.integrity import CHECKSUM_KEY, check_finite, export_metadata, verify
from ssl_kit.run_dir import writable_dir, writable_file

METADATA_KEY = "ssl_kit"


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
        if key in _VERIFIED:
            ckpt.pop(CHECKSUM_KEY, None)
        else:
            verify(ckpt, str(path))
            if isinstance(ckpt.get("state_dict"), dict):
                check_finite(ckpt["state_dict"], str(path))
            _VERIFIED.add(key)
        return ckpt
    except CorruptCheckpointError as err:
        from ssl_kit.run_dir import alternative_hint  # lazy: run_dir loads checkpoints through here

        raise CorruptCheckpointError(f"{err}.{alternative_hint(path)}") from None


#: (path, inode, size, mtime) of files verified in this process: a resume reads its checkpoint twice.
_VERIFIED: set[tuple] = set()


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def read_checkpoint(path: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong with the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not (mmap and "mmap can only be used" in str(err)):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CorruptCheckpointError(f"{path} is corrupt ({_first_line(err)})") from None
        raise UserError(f"refusing to load {str(path)!r}: it is not a plain-tensor checkpoint that loads with "
                        f"weights_only=True ({type(err).__name__}: {_first_line(err)}).") from None
    except Exception as err:  # zip reader, EOF, bad magic number: a truncated or overwritten file
        raise CorruptCheckpointError(f"{path} is truncated or not a checkpoint "
                                     f"({type(err).__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["no details"])[0]


def encoder_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> tuple[str, dict, dict]:
    """(timm name, timm kwargs, encoder state dict in timm's key layout) from an ssl_kit checkpoint."""
    info = ckpt.get(METADATA_KEY)
    if info is None:
        raise UserError(f"{source} is not an ssl_kit training checkpoint (no {METADATA_KEY!r} entry; keys: {sorted(ckpt)[:8]}).")
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return info["encoder_name"], dict(info["encoder_kwargs"]), state


def export(checkpoint: str, output: str | None = None) -> Path:
    """Write the encoder of an ssl_kit checkpoint as safetensors in timm's key layout.

    The file's metadata holds the timm model name and its arguments, so
    ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=output), **kwargs)``
    rebuilds it. An ``output`` ending in ``/`` (or an existing directory) gets timm's hub layout
    instead, ``config.json`` + ``model.safetensors``, which
    ``timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)`` loads with no other argument.

    Args:
        checkpoint: an ssl_kit ``.ckpt`` (any method).
        output: destination ``.safetensors`` path or ``DIR/`` (default: the checkpoint's path with
            that suffix).
    """
    from ssl_kit.export_folder import is_folder_output, write_model_folder

    folder = is_folder_output(output)
    if folder:
        out = writable_dir(Path(output), "the export")
    else:
        out = writable_file(Path(output) if output is not None else Path(checkpoint).with_suffix(".safetensors"),
                            "the export")
    ckpt = load_checkpoint(checkpoint)
    name, kwargs, state = encoder_from_checkpoint(ckpt, checkpoint)
    tensors = {k: v.contiguous() for k, v in state.items()}
    metadata = {"timm_model": name, "timm_kwargs": json.dumps(kwargs), "format": "pt", **export_metadata(tensors)}
    if folder:
        img_size = kwargs.get("img_size", (ckpt.get("hyper_parameters") or {}).get("img_size"))
        source = {"checkpoint": str(checkpoint), "method": ckpt[METADATA_KEY].get("method")}
        write_model_folder(out, name, kwargs, tensors, metadata, img_size, source)
        print(f"exported {len(state)} tensors of {name} {kwargs} to {out}/ (timm hub layout: config.json + "
              f"model.safetensors, with checksums)")
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:  # atomic and durable: never a half-written file at `output`
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"exported {len(state)} tensors of {name} {kwargs} to {out} (with checksums)")
    return out

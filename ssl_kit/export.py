"""Export a trained encoder as a timm-loadable ``.safetensors`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

METADATA_KEY = "ssl_kit"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``: no code in the file can run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"refusing to load {str(path)!r}: it is not a plain-tensor checkpoint that loads with "
            f"weights_only=True ({type(err).__name__}: {str(err).splitlines()[0]})."
        ) from err


def encoder_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> tuple[str, dict, dict]:
    """(timm name, timm kwargs, encoder state dict in timm's key layout) from an ssl_kit checkpoint."""
    info = ckpt.get(METADATA_KEY)
    if info is None:
        raise ValueError(f"{source} is not an ssl_kit training checkpoint (no {METADATA_KEY!r} entry; keys: {sorted(ckpt)[:8]}).")
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return info["encoder_name"], dict(info["encoder_kwargs"]), state


def export(checkpoint: str, output: str | None = None) -> Path:
    """Write the encoder of an ssl_kit checkpoint as safetensors in timm's key layout.

    The file's metadata holds the timm model name and its arguments, so
    ``timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=output), **kwargs)``
    rebuilds it.

    Args:
        checkpoint: an ssl_kit ``.ckpt`` (any method).
        output: destination ``.safetensors`` path (default: the checkpoint's path with that suffix).
    """
    name, kwargs, state = encoder_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    out = Path(output) if output is not None else Path(checkpoint).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"timm_model": name, "timm_kwargs": json.dumps(kwargs), "format": "pt"}
    tmp = out.with_suffix(out.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(out)  # atomic: never a half-written file at `output`
    print(f"exported {len(state)} tensors of {name} {kwargs} to {out}")
    return out

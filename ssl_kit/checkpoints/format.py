"""What an ssl_kit checkpoint and an export record about their encoder: the one place that
writes and parses it.

A training checkpoint (Lightning ``.ckpt``) carries, beside Lightning's entries, under
``checkpoint["ssl_kit"]``::

    {"method": "MAE",                     # the LightningModule class name
     "encoder_name": "vit_base_patch16_224", "encoder_kwargs": {...},   # timm.create_model(name, **kwargs)
     "encoder_prefix": "encoder.",        # where the evaluated encoder's weights sit in state_dict
     "run_seed": 0,                       # the seed the run started with (step-seeded draws)
     ...}                                 # method extras (EVA: "teacher")

An export (``.safetensors``) holds the encoder's tensors in timm's key layout and, as metadata,
``timm_model``, ``timm_kwargs`` (JSON) and the tensors' checksums, so
``timm.create_model(timm_model, pretrained=True, pretrained_cfg_overlay=dict(file=...), **timm_kwargs)``
rebuilds it. Nothing here instantiates a class named in a file.
"""

from __future__ import annotations

import json
from typing import Any

from torch import Tensor

from ssl_kit.checkpoints.integrity import export_metadata as checksum_metadata
from ssl_kit.checkpoints.integrity import verify_export
from ssl_kit.errors import UserError

METADATA_KEY = "ssl_kit"
#: Where the evaluated encoder sits when a checkpoint predates ``encoder_prefix``.
DEFAULT_PREFIX = "encoder."


def encoder_record(method: str, name: str, kwargs: dict[str, Any], prefix: str = DEFAULT_PREFIX,
                   **extra: Any) -> dict[str, Any]:
    """The ``checkpoint["ssl_kit"]`` entry (plain Python values: it loads with ``weights_only=True``)."""
    return {"method": method, "encoder_name": name, "encoder_kwargs": dict(kwargs), "encoder_prefix": prefix,
            **extra}


def encoder_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint") -> tuple[str, dict, dict[str, Tensor]]:
    """(timm name, timm kwargs, encoder state dict in timm's key layout) of an ssl_kit checkpoint.

    Raises:
        UserError: the file is not an ssl_kit training checkpoint.
    """
    info = ckpt.get(METADATA_KEY)
    if info is None or "state_dict" not in ckpt:
        raise UserError(f"{source} is not an ssl_kit training checkpoint (no {METADATA_KEY!r} entry; "
                        f"keys: {sorted(ckpt)[:8]}).")
    prefix = info.get("encoder_prefix", DEFAULT_PREFIX)
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return info["encoder_name"], dict(info["encoder_kwargs"]), state


def export_metadata(name: str, kwargs: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, str]:
    """Safetensors metadata of an export: the timm name and arguments, and the tensors' checksums."""
    return {"timm_model": name, "timm_kwargs": json.dumps(kwargs), "format": "pt", **checksum_metadata(tensors)}


def read_export_metadata(meta: dict[str, str], tensors: dict[str, Tensor], source: str,
                         model_name: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """(timm name, timm kwargs) of an export, after checking its tensors against its checksums.
    Other safetensors files in timm's layout carry no name: ``model_name`` supplies it (or None)."""
    verify_export(meta, tensors, source)
    return meta.get("timm_model", model_name), json.loads(meta.get("timm_kwargs", "{}"))

"""Export as a folder in timm's hub layout: ``config.json`` + ``model.safetensors``.

``timm.create_model("local-dir:FOLDER", pretrained=True, num_classes=0)`` rebuilds the encoder from
it with no further arguments (timm reads ``architecture`` and ``model_args`` from config.json and
the weights from model.safetensors), and so does the Hugging Face Hub after an upload
(``hf-hub:user/repo``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor

from ssl_kit.checkpoints import atomic_save_safetensors, atomic_write
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD

#: Files of the folder, as timm's hub loader names them.
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

#: timm drops training-only arguments from exported ``model_args``; so do we.
TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
                      "pos_drop_rate", "patch_drop_rate")

#: Architecture facts kept from timm's default config of the model (not its weights' provenance).
ARCH_KEYS = ("first_conv", "classifier", "fixed_input_size", "pool_size")


def is_folder_output(output: str | None) -> bool:
    """``--output`` names a folder export: it ends with a path separator or is an existing directory."""
    return output is not None and (output.endswith(("/", os.sep)) or Path(output).is_dir())


def hub_config(name: str, kwargs: dict[str, Any], img_size: int | None, source: dict[str, Any]) -> dict[str, Any]:
    """timm's hub ``config.json`` for the encoder ``name(**kwargs)``; preprocessing is ssl_kit's
    evaluation transform (ImageNet mean/std, bicubic resize to ``img_size / 0.875``, centre crop)."""
    with torch.device("meta"):  # shapes and defaults only: nothing is initialised
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    size = img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    pretrained_cfg = {k: model.pretrained_cfg[k] for k in ARCH_KEYS if model.pretrained_cfg.get(k) is not None}
    pretrained_cfg.update({
        "architecture": name, "tag": "ssl_kit", "custom_load": False, "num_classes": 0,
        "input_size": [3, size, size], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
    })
    if pretrained_cfg.get("pool_size") is not None and size != model.pretrained_cfg.get("input_size", (0, 0, 0))[-1]:
        pretrained_cfg.pop("pool_size")  # the default's pool size belongs to the default resolution
    global_pool = getattr(model, "global_pool", None)
    return {
        "architecture": name,
        "num_classes": 0,
        "num_features": int(model.num_features),
        **({"global_pool": global_pool} if isinstance(global_pool, str) and global_pool else {}),
        "model_args": {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_ARGS and k != "num_classes"},
        "pretrained_cfg": pretrained_cfg,
        "ssl_kit": source,
    }


def write_model_folder(out: Path, name: str, kwargs: dict[str, Any], tensors: dict[str, Tensor],
                       metadata: dict[str, str], img_size: int | None, source: dict[str, Any]) -> Path:
    """Write ``out/model.safetensors`` (with ``metadata``: checksums, timm name) and ``out/config.json``.

    Each file is written to a temporary name, synced and renamed (:func:`~ssl_kit.checkpoints.atomic_write`),
    so a reader never sees half a file.
    """
    config = hub_config(name, kwargs, img_size, source)
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME, metadata)
    atomic_write(out / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return out

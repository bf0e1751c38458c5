"""Checking timm model names before building anything (shared by every backbone)."""

from __future__ import annotations

import timm


def check_timm_name(model_name: str) -> None:
    """Raise a ValueError naming ``model_name`` and similar timm names if timm does not know it."""
    if timm.is_model(model_name):
        return
    stem = model_name.split("_")[0]
    similar = timm.list_models(f"{stem}*")[:12]
    hint = f" Similar timm names: {', '.join(similar)}." if similar else ""
    raise ValueError(f"Unknown timm model name {model_name!r}.{hint} See timm.list_models().")

"""Checking timm model names before building anything (shared by every backbone)."""

from __future__ import annotations

import difflib

import timm

from ssl_kit.errors import UserError


def check_timm_name(model_name: str) -> None:
    """Raise a :class:`UserError` naming ``model_name`` and the closest timm names if timm does not know it."""
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(f"Unknown timm model name {model_name!r}.{hint} See timm.list_models().")

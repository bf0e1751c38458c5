"""Frozen sub-modules stay out of checkpoints.

A module that is never trained and can be rebuilt from its own source (EVA's teacher, from its
file; the linear probe's encoder, from ``--encoder``) is dropped from every checkpoint the run
writes, so checkpoints stay small and hold only what training changed. On load the module's
current weights (rebuilt by the constructor) are put back into the loaded state dict, so a strict
``load_state_dict`` still sees every key.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn


def strip_frozen(state: dict[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """``state`` without the keys under ``prefixes`` (e.g. ``("teacher.",)``), in place; returns it."""
    for key in [k for k in state if k.startswith(tuple(prefixes))]:
        del state[key]
    return state


def restore_frozen(state: dict[str, Tensor], module: nn.Module, prefixes: Sequence[str]) -> dict[str, Tensor]:
    """Put ``module``'s own weights under ``prefixes`` back into a loaded ``state``, in place; returns it."""
    own = module.state_dict()
    state.update({k: v for k, v in own.items() if k.startswith(tuple(prefixes))})
    return state

"""Process RNG states as plain tensors and ints, so a checkpoint holding them loads with ``weights_only=True``."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


def module_generators(module: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute of ``module`` or its sub-modules, by dotted name."""
    found = {}
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                found[f"{prefix}.{attr}" if prefix else attr] = value
    return found


def capture_rng_state(module: nn.Module | None = None) -> dict[str, Any]:
    """The torch (CPU and every CUDA device), NumPy and Python RNG states of this process, plus
    those of any ``torch.Generator`` that ``module`` holds (e.g. for masking).

    Examples:
        >>> state = capture_rng_state(); a = torch.rand(1)
        >>> restore_rng_state(state); bool(torch.rand(1) == a)
        True
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, mt, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if module is not None:
        state["generators"] = {name: g.get_state() for name, g in module_generators(module).items()}
    return state


def restore_rng_state(state: dict[str, Any], module: nn.Module | None = None) -> None:
    """Set this process's RNGs (and ``module``'s generators) to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if module is not None:
        generators = module_generators(module)
        for name, g_state in state.get("generators", {}).items():
            if name in generators:
                generators[name].set_state(g_state)

"""Shared test helpers: tiny models, subprocess CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(2)


def run_cli(*args: str, cwd: Path | str = REPO, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ssl_kit ARGS`` as a real subprocess (environment: ``env`` or this process's);
    returns the completed process."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "ssl_kit", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"


#: Arguments for a MAE small enough for CPU tests: ViT-Tiny at 32 px, patch 4 (64 patches).
TINY_MAE = dict(
    model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, decoder_embed_dim=64,
    decoder_depth=1, decoder_num_heads=2, warmup_epochs=0.0,
)


@pytest.fixture
def tiny_mae():
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    return MAE(**TINY_MAE)

"""Loggers chosen by config (``trainer.logger``) write into the run directory unless told otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: ``save_dir`` values that mean "not chosen": None, and the current directory (WandbLogger's default).
UNSET_SAVE_DIRS = (None, ".", "./")


def loggers_into_run_dir(logger: Any, run_dir: Path) -> None:
    """Point every configured logger whose ``save_dir`` is unset (None or ".") at ``run_dir``.

    ``logger`` is the parsed ``trainer.logger`` value: one ``class_path``/``init_args`` entry or a
    list of them (TensorBoard, CSV, W&B, MLflow, ... as Lightning's loggers take ``save_dir``).
    A run directory renamed at start (``runs/mae`` busy -> ``runs/mae-1``) is followed.
    """
    for entry in logger if isinstance(logger, list) else [logger]:
        init_args = getattr(entry, "init_args", None) if not isinstance(entry, dict) else entry.get("init_args")
        if init_args is not None and "save_dir" in init_args and init_args["save_dir"] in UNSET_SAVE_DIRS:
            init_args["save_dir"] = str(run_dir)

"""``python -m ssl_kit``: LightningCLI for fit/validate/test plus the ``export`` job."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from jsonargparse import CLI
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ssl_kit.callbacks import NaNGuard, RunCheckpoint, SpeedUp
from ssl_kit.callbacks.speed import auto_precision
from ssl_kit.data import SSLDataModule
from ssl_kit.methods import SSLMethod

#: Jobs that are not Trainer methods: name -> "module:function", each run through jsonargparse.
EXTRA_COMMANDS = {
    "export": "ssl_kit.export:export",
    "knn": "ssl_kit.evaluators.knn_job:knn",
    "bench": "ssl_kit.bench:bench",
    "aggregate": "ssl_kit.evaluators.results:aggregate",
    "demo": "ssl_kit.demo:demo",
}

CHECKPOINT_SUFFIXES = (".ckpt",)

ENCODER_HELP = ("evaluation configs (eval/linear.yaml, eval/finetune.yaml): the encoder to evaluate, an ssl_kit "
                ".ckpt, an exported .safetensors, an official MAE/ConvNeXt V2 .pth or a timm name (random init); "
                "sets model.init_args.encoder")


class RunDirConfig(SaveConfigCallback):
    """Saves the resolved config beside the checkpoints, never over an earlier one."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path, n = run_dir / "config.yaml", 1
        while path.exists():  # a resumed run keeps the original config and adds config.N.yaml
            path, n = run_dir / f"config.{n}.yaml", n + 1
        self.parser.save(self.config, str(path), skip_none=False, multifile=False)


#: ``--ckpt_path`` values that resume from the run directory (see ``resume_checkpoint``).
RESUME_LAST, RESUME_IF_EXISTS = "last", "last_if_exists"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newer of ``last.ckpt`` and Lightning's SLURM ``hpc_ckpt_N.ckpt`` in ``run_dir``, if any."""
    found = [p for p in [run_dir / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def slurm_requeued() -> bool:
    """True in a SLURM job that was requeued (SLURM sets ``SLURM_RESTART_COUNT`` >= 1)."""
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def resume_checkpoint(run_dir: Path, ckpt_path: str | None) -> str | None:
    """Resolve ``--ckpt_path`` for ``fit``: a file path, or None for a fresh start.

    ``last`` must find a checkpoint (no silent fresh start); ``last_if_exists`` resumes if it can;
    a requeued SLURM job without ``--ckpt_path`` behaves like ``last_if_exists``.
    """
    if ckpt_path is None and slurm_requeued():
        ckpt_path = RESUME_IF_EXISTS
    if ckpt_path not in (RESUME_LAST, RESUME_IF_EXISTS):
        return ckpt_path
    found = newest_checkpoint(run_dir)
    if found is None and ckpt_path == RESUME_LAST:
        raise SystemExit(f"error: --ckpt_path last: no {run_dir / 'last.ckpt'} (or hpc_ckpt_*.ckpt) to resume "
                         f"from. Check --trainer.default_root_dir, or pass --ckpt_path last_if_exists to start "
                         f"fresh when there is nothing to resume.")
    print(f"resuming from {found}" if found else f"--ckpt_path {ckpt_path}: no checkpoint in {run_dir}, starting fresh")
    return str(found) if found else None


def fresh_run_dir(run_dir: Path) -> Path:
    """``run_dir`` itself if it holds no checkpoint, else the first free ``run_dir-N``."""
    candidate, n = run_dir, 1
    while candidate.is_dir() and any(p.suffix in CHECKPOINT_SUFFIXES for p in candidate.iterdir()):
        candidate, n = run_dir.with_name(f"{run_dir.name}-{n}"), n + 1
    return candidate


class SSLCLI(LightningCLI):
    """LightningCLI with ssl_kit's run directory: checkpoints, config and logs in one place."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SpeedUp, "speed")
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})
        parser.add_argument("--encoder", type=Optional[str], default=None, help=ENCODER_HELP)

    def _apply_encoder_flag(self, config) -> None:
        """``--encoder SRC`` is shorthand for ``--model.init_args.encoder SRC`` (evaluation configs)."""
        if config.get("encoder") is None:
            return
        init_args = config.model.get("init_args")
        if init_args is None or "encoder" not in init_args:
            raise SystemExit(f"error: --encoder applies to evaluation configs (eval/*.yaml); "
                             f"{config.model.get('class_path')} takes no encoder argument.")
        init_args.encoder = config.encoder

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._apply_encoder_flag(config)
        run_dir = Path(config.trainer.default_root_dir)
        if self.subcommand == "fit":
            resuming = config.get("ckpt_path") in (RESUME_LAST, RESUME_IF_EXISTS) or slurm_requeued()
            config.ckpt_path = resume_checkpoint(run_dir, config.get("ckpt_path"))
            if config.ckpt_path is None and not resuming:
                new_dir = fresh_run_dir(run_dir)
                if new_dir != run_dir:
                    print(f"{run_dir} already holds checkpoints; starting a new run in {new_dir} "
                          f"(to resume instead, pass --ckpt_path last)")
                run_dir = new_dir
        config.trainer.default_root_dir = str(run_dir)
        if config.trainer.precision is None:  # unset = auto: bf16-mixed on a bf16 GPU, else 32-true
            config.trainer.precision = auto_precision(config.trainer.accelerator)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = str(run_dir)
        if config.trainer.logger in (None, True):
            config.trainer.logger = {
                "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run_dir), "name": "tb", "version": ""},
            }
        print(f"run directory: {run_dir}")

    def instantiate_classes(self) -> None:
        with user_errors():
            super().instantiate_classes()

    def before_fit(self) -> None:
        # Scan the data before any long work so a bad root or empty folder fails at once.
        with user_errors():
            self.datamodule.check()


@contextmanager
def user_errors():
    """Turn configuration errors (bad values, missing files) into one clean line, exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def run_extra(name: str, argv: list[str]) -> None:
    module_name, fn_name = EXTRA_COMMANDS[name].split(":")
    module = __import__(module_name, fromlist=[fn_name])
    fn = getattr(module, fn_name)
    with user_errors():
        if getattr(fn, "parses_own_args", False):  # e.g. bench: takes fit's config and --model.* flags
            return fn(argv)
        CLI(fn, args=argv, as_positional=True)


HELP_HEADER = """usage: python -m ssl_kit {fit,validate,test,predict,%s} ...

Self-supervised pretraining (MAE, FCMAE, ReLICv2, EVA) and evaluation.

  fit / validate / test / predict   LightningCLI jobs: --config FILE, --model.*, --data.*, --trainer.*
  %s

Run `python -m ssl_kit SUBCOMMAND --help` for every option of a job.
"""


def main(argv: list[str] | None = None) -> None:
    from_python = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return run_extra(argv[0], argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        extras = "\n  ".join(f"{n:<33} {_summary(n)}" for n in EXTRA_COMMANDS)
        print(HELP_HEADER % (",".join(EXTRA_COMMANDS), extras))
        if not argv:
            raise SystemExit(2)
    SSLCLI(
        SSLMethod,
        SSLDataModule,
        subclass_mode_model=True,
        save_config_callback=RunDirConfig,
        auto_configure_optimizers=False,
        args=argv if from_python else None,
    )


def _summary(name: str) -> str:
    module_name, fn_name = EXTRA_COMMANDS[name].split(":")
    fn = getattr(__import__(module_name, fromlist=[fn_name]), fn_name)
    return (fn.__doc__ or "").strip().splitlines()[0]

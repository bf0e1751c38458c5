"""``python -m ssl_kit``: LightningCLI's ``fit`` plus the extra jobs (export, knn, bench, ...).

Only ``fit`` of LightningCLI's subcommands is offered: no module implements a validation, test
or predict step for ``validate``/``test``/``predict`` to run (evaluators score inside ``fit``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import yaml
from jsonargparse import ArgumentParser, auto_cli
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from ssl_kit.callbacks import NaNGuard, OnlineEvalData, RunCheckpoint, SpeedUp
from ssl_kit.callbacks.resume_guard import ResumeGuard
from ssl_kit.callbacks.speed import auto_precision
from ssl_kit.data import SSLDataModule
from ssl_kit.errors import UserError, parse_error_line, user_errors
from ssl_kit.loggers import loggers_into_run_dir
from ssl_kit.methods import SSLMethod  # noqa: F401  (registers the methods with the CLI)
from ssl_kit.optim.training import TrainingModule
from ssl_kit.run_dir import writable_dir
from ssl_kit.run_lock import claim_run_dir, release_claims

#: Jobs that are not Trainer methods: name -> "module:function", each run through jsonargparse.
EXTRA_COMMANDS = {
    "export": "ssl_kit.export:export",
    "knn": "ssl_kit.evaluators.knn_job:knn",
    "bench": "ssl_kit.bench.job:bench",
    "aggregate": "ssl_kit.evaluators.results:aggregate",
    "shard": "ssl_kit.data.shard_writer:shard",
    "demo": "ssl_kit.demo:demo",
    "show": "ssl_kit.show:show",
}

ENCODER_HELP = ("evaluation configs (eval/linear.yaml, eval/finetune.yaml): the encoder to evaluate, an ssl_kit "
                ".ckpt, an exported .safetensors, an official MAE/ConvNeXt V2 .pth or a timm name (random init); "
                "sets model.init_args.encoder")


class RunDirConfig(SaveConfigCallback):
    """Records the resolved config beside the checkpoints when training starts.

    The first segment of a run writes ``config.yaml``; a resumed segment writes
    ``config.step=NNNNNN.yaml``, NNNNNN being the global step it resumed at, so each checkpoint is
    described by the config with the largest step not above its own. A start that fails before
    training (bad value, corrupt checkpoint, refused resume) writes nothing.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def setup(self, trainer, pl_module, stage: str) -> None:
        pass  # not yet: the checkpoint is restored (and may be refused) after setup

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, "fit")

    def save_config(self, trainer, pl_module, stage: str) -> None:
        run_dir, step = Path(trainer.default_root_dir), trainer.global_step
        path = run_dir / ("config.yaml" if step == 0 else f"config.step={step:06d}.yaml")
        origin = f"resumed at global step {step} from {trainer.ckpt_path}" if step else "started at global step 0"
        text = f"# {origin}\n" + self.parser.dump(self.config, skip_none=False)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


class OneLineErrors:
    """Parser mix-in: a parse error is one line naming the key and what is allowed (no usage dump;
    ``--help`` lists every option), exit code 2."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        self._logger.error(message)
        print(f"error: {parse_error_line(message)}", file=sys.stderr, flush=True)
        self.exit(2)


class OneLineLightningParser(OneLineErrors, LightningArgumentParser):
    """``LightningArgumentParser`` with one-line errors."""


class OneLineParser(OneLineErrors, ArgumentParser):
    """jsonargparse ``ArgumentParser`` with one-line errors (the extra jobs: export, knn, ...)."""


class SSLCLI(LightningCLI):
    """LightningCLI with ssl_kit's run directory: checkpoints, config and logs in one place."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", OneLineLightningParser)
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` only: the other Trainer subcommands would run steps no module implements."""
        return {"fit": LightningCLI.subcommands()["fit"]}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SpeedUp, "speed")
        parser.add_lightning_class_args(NaNGuard, "nan_guard")
        parser.add_lightning_class_args(ResumeGuard, "resume")
        parser.add_lightning_class_args(OnlineEvalData, "online_eval")
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})
        parser.add_argument("--encoder", type=Optional[str], default=None, help=ENCODER_HELP)

    def _apply_encoder_flag(self, config) -> None:
        """``--encoder SRC`` is shorthand for ``--model.init_args.encoder SRC`` (evaluation configs)."""
        if config.get("encoder") is None:
            return
        init_args = config.model.get("init_args")
        if init_args is None or "encoder" not in init_args:
            raise UserError(f"--encoder applies to evaluation configs (eval/*.yaml); "
                            f"{config.model.get('class_path')} takes no encoder argument.")
        init_args.encoder = config.encoder

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._apply_encoder_flag(config)
        run_dir = Path(config.trainer.default_root_dir)
        if self.subcommand == "fit":  # locked before any long work: the lock file proves it writable
            claim = claim_run_dir(run_dir, config.get("ckpt_path"))
            run_dir, config.ckpt_path = claim.run_dir, claim.ckpt_path
        else:
            writable_dir(run_dir, "logs")
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
        elif config.trainer.logger is not False:
            loggers_into_run_dir(config.trainer.logger, run_dir)
        print(f"run directory: {run_dir}")

    def before_fit(self) -> None:
        # Scan the data before any long work so a bad root or empty folder fails at once.
        self.datamodule.check()


def check_yaml_configs(argv: list[str]) -> None:
    """Parse every ``--config FILE`` as YAML first, so a syntax error names its file and line."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        try:
            yaml.safe_load(Path(name).read_text())
        except OSError:
            continue  # missing files: the parser names them
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise UserError(f"{name}:{where}: YAML syntax error: {problem}") from None


def run_extra(name: str, argv: list[str]) -> None:
    module_name, fn_name = EXTRA_COMMANDS[name].split(":")
    module = __import__(module_name, fromlist=[fn_name])
    fn = getattr(module, fn_name)
    with user_errors():
        if getattr(fn, "parses_own_args", False):  # e.g. bench: takes fit's config and --model.* flags
            return fn(argv)
        check_yaml_configs(argv)
        auto_cli(fn, args=argv, as_positional=True, parser_class=OneLineParser)


HELP_HEADER = """usage: python -m ssl_kit {fit,%s} ...

Self-supervised pretraining (MAE, FCMAE, ReLICv2, EVA) and evaluation.

  fit                               LightningCLI: --config FILE, --model.*, --data.*, --trainer.*
                                    (pretraining, linear probe, fine-tune)
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
    try:
        with user_errors():
            check_yaml_configs(argv)
            SSLCLI(
                TrainingModule,
                SSLDataModule,
                subclass_mode_model=True,
                save_config_callback=RunDirConfig,
                auto_configure_optimizers=False,
                args=argv if from_python else None,
            )
    finally:
        release_claims()


def _summary(name: str) -> str:
    module_name, fn_name = EXTRA_COMMANDS[name].split(":")
    fn = getattr(__import__(module_name, fromlist=[fn_name]), fn_name)
    return (fn.__doc__ or "").strip().splitlines()[0]

"""The base shared by the trained evaluators (linear probe, fine-tuning): a loaded encoder,
labelled data checks, and a results JSON in the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ssl_kit.backbones.convnextv2_sparse import fast_grn_
from ssl_kit.data.datasets import ImageFolder
from ssl_kit.errors import UserError
from ssl_kit.optim.training import OptimizerCallable, TrainingModule, adamw
from ssl_kit.views import EvalTransform

#: The LightningCLI flag ``--encoder SRC`` sets this init argument (see ``ssl_kit/cli.py``).
ENCODER_ARG = "encoder"


def check_classification_data(datamodule) -> int:
    """Number of classes, after checking that both splits are labelled with the same classes.

    Raises:
        ValueError: the data has no labels, or ``val_root`` has other class folders than ``root``.
    """
    dm = datamodule
    if not dm.has_labels():
        raise UserError(
            f"evaluation needs labelled images, but data.dataset={dm.dataset!r} (root={dm.root!r}, "
            f"val_root={dm.val_root!r}) has none: put every image in a class sub-folder, ROOT/CLASS/IMAGE."
        )
    classes = list(dm.classes())
    val_source = dm.split("val", None).subset.dataset
    if isinstance(val_source, ImageFolder):
        # The data module forces the training classes onto val_root; compare the folders themselves.
        found = sorted({f.relative_to(val_source.root).parts[0] for f in val_source.files})
        if found != classes:
            missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            diff = "; ".join(f"{what} {names[:5]}" for what, names in (("lacks", missing), ("adds", extra)) if names)
            raise UserError(
                f"train and val class lists differ: val_root={dm.val_root!r} {diff} ({len(classes)} training "
                f"classes, {len(found)} val classes); both need the same class folders."
            )
    return len(classes)


class Evaluator(TrainingModule):
    """Base of :class:`LinearProbe` and :class:`FineTune`: loads ``encoder`` with
    :func:`ssl_kit.load_encoder`, checks the data before training, and writes
    ``<run dir>/<results_file>`` when ``fit`` ends. The optimisation machinery (lr scaling,
    warm-up + cosine) is the training base's, shared with the pretraining methods.

    Args:
        encoder: what to evaluate: an ssl_kit checkpoint, an exported ``.safetensors``, an official
            MAE / ConvNeXt V2 checkpoint, or a timm model name (random init). CLI: ``--encoder``.
        model_name: timm architecture for checkpoints that do not name one.
        img_size: evaluation resolution (position embeddings are interpolated to it).
        results_file: JSON written in the run directory.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`~ssl_kit.optim.training.TrainingModule`.
    """

    def __init__(
        self,
        encoder: str | None = None,
        model_name: str | None = None,
        img_size: int = 224,
        results_file: str = "results.json",
        optimizer: OptimizerCallable = adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 0.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        if encoder is None:
            raise UserError(
                f"{type(self).__name__} needs an encoder: pass --encoder SRC (an ssl_kit .ckpt, an exported "
                f".safetensors, an official MAE/ConvNeXt V2 .pth, or a timm model name for a random-init baseline)."
            )
        from ssl_kit.checkpoints.load import load_encoder  # read at call time: tests substitute a stand-in

        self.encoder = fast_grn_(load_encoder(encoder, model_name=model_name, img_size=img_size))
        self.encoder_source, self.img_size, self.results_file = encoder, img_size, results_file
        self.num_classes: int | None = None

    def setup(self, stage: str) -> None:
        # Before any feature extraction or training step, so bad data fails at once.
        self.num_classes = check_classification_data(self.trainer.datamodule)

    def eval_transform(self) -> Callable:
        """Deterministic transform for feature extraction (resize, centre crop, normalise)."""
        return EvalTransform(self.img_size)

    def results_path(self) -> Path:
        return Path(self.trainer.default_root_dir) / self.results_file

    def seed(self) -> int:
        """The run's seed (``seed_everything``), recorded with its results."""
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Not `checkpoint["ssl_kit"]`: an evaluation run is not a pretraining checkpoint to export.
        checkpoint["ssl_kit_eval"] = {"evaluator": type(self).__name__, "encoder": self.encoder_source,
                                      "num_classes": self.num_classes}

    def build_encoder(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} evaluates a given encoder; it has no random-init twin.")

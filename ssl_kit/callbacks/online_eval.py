"""Labelled data for the online probes, separate from the (possibly unlabelled) pretraining data."""

from __future__ import annotations

import typing

import pytorch_lightning as pl

from ssl_kit.data import SSLDataModule
from ssl_kit.errors import UserError


def dataset_kinds() -> tuple[str, ...]:
    """The ``dataset`` values :class:`~ssl_kit.data.SSLDataModule` accepts (read from its signature)."""
    return typing.get_args(typing.get_type_hints(SSLDataModule.__init__)["dataset"])


class OnlineEvalData(pl.Callback):
    """The labelled train/val images :class:`~ssl_kit.callbacks.OnlineKNN` and
    :class:`~ssl_kit.callbacks.OnlineLinearProbe` use instead of the pretraining data, so
    pretraining may run on unlabelled images (``--online_eval.root DIR``,
    ``--online_eval.val_root DIR``, ``--online_eval.dataset digits``). With neither ``dataset``
    nor ``root`` set it provides nothing and the probes read the pretraining data's splits.

    The images pass through the model's evaluation transform (resize, centre crop, normalise)
    at the model's resolution. The data is scanned, and must be labelled, when fitting starts.

    Args:
        dataset: any kind :class:`~ssl_kit.data.SSLDataModule` reads (``folder``, ``digits``, ...;
            default ``folder`` when ``root`` is given).
        root: labelled image folder (``root/<class>/<image>``); the probes' training split.
        val_root: a separate labelled validation folder; otherwise ``val_fraction`` of ``root``.
        val_fraction: held-out share when there is no ``val_root``.
        batch_size: batch of the probes (feature extraction and the linear probe's steps).
        num_workers: loader processes (default: the data module's rule, min(8, CPUs)).
        image_size: side of generated images (``digits``, ``synthetic``; default: the model's).

    Examples:
        >>> callbacks = [OnlineEvalData(root="/data/labelled/train", val_root="/data/labelled/val"),
        ...              OnlineKNN(), OnlineLinearProbe()]  # doctest: +SKIP
    """

    def __init__(self, dataset: str | None = None, root: str | None = None, val_root: str | None = None,
                 val_fraction: float = 0.2, batch_size: int = 256, num_workers: int | None = None,
                 image_size: int | None = None) -> None:
        if dataset is None and (root is not None or val_root is not None):
            dataset = "folder"
        if dataset is not None and dataset not in dataset_kinds():
            raise UserError(f"online_eval.dataset={dataset!r} is not allowed: use one of {list(dataset_kinds())}.")
        if dataset == "folder" and root is None:
            raise UserError("online_eval.dataset='folder' needs online_eval.root (a folder of class sub-folders).")
        self.dataset, self.root, self.val_root, self.val_fraction = dataset, root, val_root, val_fraction
        self.batch_size, self.num_workers, self.image_size = batch_size, num_workers, image_size
        self.data: SSLDataModule | None = None

    @property
    def enabled(self) -> bool:
        return self.dataset is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled or self.data is not None:
            return
        self.data = SSLDataModule(
            dataset=self.dataset, root=self.root, val_root=self.val_root, val_fraction=self.val_fraction,
            batch_size=self.batch_size, num_workers=self.num_workers,
            image_size=self.image_size or getattr(pl_module, "img_size", 32),
        )
        self.data.set_transforms(None, pl_module.eval_transform())
        if not self.data.has_labels():  # scans the folders now, before any training step
            raise UserError(f"online_eval: {self.root or self.dataset!r} has no labels: put every image in a class "
                             f"sub-folder (root/<class>/<image>), for train and val alike.")


def labelled_data(trainer: pl.Trainer):
    """The data the online probes use: :class:`OnlineEvalData`'s if one is configured, else the
    trainer's data module (which may be unlabelled: check ``has_labels()``)."""
    for callback in trainer.callbacks:
        if isinstance(callback, OnlineEvalData) and callback.enabled:
            return callback.data
    return trainer.datamodule

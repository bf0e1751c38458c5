"""Online k-NN during pretraining: watch representation quality live."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_warn

from ssl_kit.callbacks.online_eval import labelled_data
from ssl_kit.errors import UserError
from ssl_kit.evaluators.features import runs_bf16
from ssl_kit.evaluators.knn import knn_accuracies
from ssl_kit.evaluators.sharded import dist_rank_world, extract_features_sharded


class OnlineKNN(pl.Callback):
    """Every ``every_n_epochs`` training epochs, weighted k-NN of the model's features on the
    validation split (bank: the training split, both un-augmented), logged as ``knn_top1`` and
    ``knn_top5``. Uses the :meth:`~ssl_kit.methods.SSLMethod.extract_features` contract, at the
    run's precision (bf16 autocast when it trains ``bf16-mixed``). The
    splits are those of :class:`~ssl_kit.callbacks.OnlineEvalData` when one is configured
    (``--online_eval.root``: labelled data separate from the pretraining data), else the data module's.

    Under DDP every rank extracts a share of the features, rank 0 searches and the result is
    broadcast, so every rank logs the same value and no rank waits on a collective alone.

    Reference: Wu et al. 2018 (non-parametric instance discrimination), DINO's k-NN protocol.

    Args:
        every_n_epochs: evaluation period in training epochs.
        k: neighbours.
        temperature: T in the vote weight ``exp(cosine / T)``.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[OnlineKNN(every_n_epochs=5)])  # doctest: +SKIP
    """

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07) -> None:
        if every_n_epochs < 1:
            raise UserError(f"every_n_epochs={every_n_epochs} is not allowed: it must be >= 1.")
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature
        self._labelled: bool | None = None

    def _usable(self, datamodule) -> bool:
        if self._labelled is None:
            self._labelled = datamodule is not None and datamodule.has_labels()
            if not self._labelled:
                rank_zero_warn("OnlineKNN: the data has no labels (or no data module) and no --online_eval data is "
                               "set; k-NN is skipped.")
        return self._labelled

    @torch.no_grad()
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        dm = labelled_data(trainer)
        if not self._usable(dm):
            return
        was_training = pl_module.training
        pl_module.eval()
        bank, bank_y = self._features(pl_module, dm, "train")
        query, query_y = self._features(pl_module, dm, "val")
        pl_module.train(was_training)
        rank, world = dist_rank_world()
        result = torch.zeros(2, dtype=torch.float64)
        if rank == 0:
            k = min(self.k, bank.shape[0])
            acc = knn_accuracies(bank, bank_y, query, query_y, [k], self.temperature, len(dm.classes()))[k]
            result = torch.tensor([acc["top1"], acc["top5"]], dtype=torch.float64)
        if world > 1:
            result = result.to(pl_module.device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(result, src=0)
        pl_module.log("knn_top1", float(result[0]), sync_dist=False, rank_zero_only=False)
        pl_module.log("knn_top5", float(result[1]), sync_dist=False, rank_zero_only=False)

    def _features(self, pl_module: pl.LightningModule, dm, split: str):
        return extract_features_sharded(
            pl_module.extract_features, dm.split(split, dm.eval_transform), dm.eval_batch_size,
            dm.num_workers, pl_module.device, runs_bf16(pl_module.trainer),
        )

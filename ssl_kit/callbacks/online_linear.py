"""Online linear probe: a classifier trained alongside pretraining on detached features."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_kit.callbacks.online_eval import labelled_data
from ssl_kit.errors import UserError
from ssl_kit.evaluators.features import runs_bf16
from ssl_kit.evaluators.sharded import dist_rank_world, extract_features_sharded


class OnlineLinearProbe(pl.Callback):
    """A linear head (BatchNorm without affine, then linear, as MAE's probe) trained during
    pretraining on features computed under ``torch.no_grad`` in eval mode, with its own SGD
    optimizer: the encoder's gradients, weights, BatchNorm statistics and RNG streams are never
    touched (as solo-learn's and lightly's online classifiers). Every training batch it takes one
    step on a labelled batch from :class:`~ssl_kit.callbacks.OnlineEvalData` (or from the
    pretraining data's training split when that is labelled); every ``every_n_epochs`` it logs
    ``linear_top1`` / ``linear_top5`` on the validation split. Under DDP each rank draws its own
    batches and the head's gradients are averaged, so the heads stay equal.

    The head and its optimizer are saved in checkpoints; the probe's batch order is not part of
    the exact-resume guarantee.

    Args:
        every_n_epochs: evaluation period in training epochs.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        seed: seed of the head's initialisation and of the probe's batch order.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[OnlineLinearProbe(every_n_epochs=5)])  # doctest: +SKIP
    """

    def __init__(self, every_n_epochs: int = 1, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 seed: int = 0) -> None:
        if every_n_epochs < 1:
            raise UserError(f"every_n_epochs={every_n_epochs} is not allowed: it must be >= 1.")
        self.every_n_epochs, self.lr, self.momentum, self.weight_decay = every_n_epochs, lr, momentum, weight_decay
        self.seed = seed
        self.head: nn.Sequential | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._usable: bool | None = None
        self._batches = None
        self._pending_state: dict | None = None

    # --- labelled batches -------------------------------------------------------------------
    def _data(self, trainer: pl.Trainer):
        data = labelled_data(trainer)
        if self._usable is None:
            self._usable = data is not None and data.has_labels()
            if not self._usable:
                rank_zero_warn("OnlineLinearProbe: no labelled data (set --online_eval.root or use labelled "
                               "pretraining data); the online linear probe is skipped.")
        return data if self._usable else None

    def _next_batch(self, trainer: pl.Trainer, data) -> tuple[Tensor, Tensor]:
        """The next labelled batch of this rank's endless, reshuffled stream."""
        while True:
            if self._batches is None:
                rank, _ = dist_rank_world()
                g = torch.Generator().manual_seed(self.seed + 1000 * rank + trainer.current_epoch)
                split = data.split("train", data.eval_transform)
                # BatchNorm cannot train on a last batch of one image: drop the remainder when there are full batches.
                loader = DataLoader(split, batch_size=data.eval_batch_size, shuffle=True, generator=g,
                                    drop_last=len(split) >= data.eval_batch_size, num_workers=data.num_workers)
                self._batches = iter(loader)
            try:
                return next(self._batches)
            except StopIteration:
                self._batches = None

    # --- the head -----------------------------------------------------------------------------
    def _build(self, dim: int, num_classes: int, device: torch.device) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        self.head.to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay)
        if self._pending_state is not None:
            self.head.load_state_dict(self._pending_state["head"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    @staticmethod
    @torch.no_grad()
    def features(pl_module: pl.LightningModule, imgs: Tensor) -> Tensor:
        """Frozen features: eval mode (BatchNorm statistics untouched), no graph to the encoder.

        Shapes:
            imgs: (B, C, H, W) -> (B, D)
        """
        was_training = pl_module.training
        pl_module.eval()
        try:
            return pl_module.extract_features(imgs).float().detach()
        finally:
            pl_module.train(was_training)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        data = self._data(trainer)
        if data is None:
            return
        imgs, labels = self._next_batch(trainer, data)
        feats = self.features(pl_module, imgs.to(pl_module.device))  # (B, D)
        if self.head is None:
            self._build(feats.shape[1], len(data.classes()), pl_module.device)
        with torch.enable_grad():
            self.head.train()
            loss = F.cross_entropy(self.head(feats), labels.to(pl_module.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._average_gradients()
        self.optimizer.step()
        pl_module.log("train/linear_loss", loss.detach(), batch_size=imgs.shape[0], sync_dist=False)

    def _average_gradients(self) -> None:
        _, world = dist_rank_world()
        if world == 1:
            return
        for p in self.head.parameters():
            on_cpu = dist.get_backend() != "nccl"
            grad = p.grad.cpu() if on_cpu else p.grad
            dist.all_reduce(grad)
            p.grad.copy_(grad / world)

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking or self.head is None:
            return
        data = self._data(trainer)
        was_training = pl_module.training
        pl_module.eval()
        feats, labels = extract_features_sharded(pl_module.extract_features, data.split("val", data.eval_transform),
                                                 data.eval_batch_size, data.num_workers, pl_module.device,
                                                 runs_bf16(trainer))
        pl_module.train(was_training)
        self.head.eval()
        logits = self.head(feats.to(pl_module.device))  # (N, classes)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()  # (N, 5)
        hits = top5 == labels[:, None]
        pl_module.log("linear_top1", 100.0 * hits[:, 0].float().mean().item(), sync_dist=False, rank_zero_only=False)
        pl_module.log("linear_top5", 100.0 * hits.any(1).float().mean().item(), sync_dist=False, rank_zero_only=False)

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._pending_state = state_dict

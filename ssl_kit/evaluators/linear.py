"""Linear probe: a linear classifier on a frozen encoder (MAE's protocol, He et al., 2021, §A.2)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ssl_kit.checkpoints.frozen import strip_frozen
from ssl_kit.errors import UserError
from ssl_kit.evaluators.base import Evaluator
from ssl_kit.evaluators.features import extract_features
from ssl_kit.evaluators.results import format_summary, seed_summary, topk_accuracy, write_results
from ssl_kit.optim.training import OptimizerCallable, warmup_cosine
from ssl_kit.optim import LARS
from ssl_kit.views import MaskedImageTransform


def lars(params) -> Optimizer:
    """MAE's linear-probe optimizer: LARS, base lr 0.1 per 256 images, momentum 0.9, no weight decay."""
    return LARS(params, lr=0.1, momentum=0.9, weight_decay=0.0)


class LinearHead(nn.Sequential):
    """BatchNorm1d without affine parameters (eps 1e-6), then a linear classifier: the BN
    whitens each feature so one lr suits encoders whose feature scales differ by orders of
    magnitude. Linear weights ~ trunc-normal(std 0.01), bias 0.

    Shapes:
        (B, D) -> (B, num_classes)
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def seeded_heads(dim: int, num_classes: int, seeds: list[int]) -> nn.ModuleList:
    """One :class:`LinearHead` per seed, each initialised from its own seed."""
    heads = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads.append(LinearHead(dim, num_classes))
    return nn.ModuleList(heads)


class SeededBatches(Sampler):
    """Index batches for several heads at once, each head with its own shuffle (seed, epoch):
    yields (H, B) index tensors. Under DDP each rank takes a disjoint strided share.
    """

    def __init__(self, n: int, batch_size: int, seeds: list[int], rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seeds = n, batch_size, list(seeds)
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        if len(self) == 0:
            raise UserError(f"the training split has {n} images, fewer than batch_size={batch_size} per device "
                             f"(x {world_size} devices); lower data.batch_size.")

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[Tensor]:
        steps, b = len(self), self.batch_size
        perms = [torch.randperm(self.n, generator=torch.Generator().manual_seed(1_000_003 * s + self.epoch))
                 for s in self.seeds]
        local = torch.stack([p[self.rank :: self.world_size][: steps * b] for p in perms])  # (H, steps * B)
        yield from local.view(len(self.seeds), steps, b).unbind(1)  # each (H, B)


def unshard(gathered: Tensor, n: int) -> Tensor:
    """Undo a strided split: rank ``r`` held items ``r, r + W, r + 2W, ...`` (padded to equal length).

    Shapes:
        gathered: (W, rows, *) -> (n, *)
    """
    return gathered.transpose(0, 1).flatten(0, 1)[:n]  # (rows * W, *): row j of rank r -> j * W + r


class CachedFeatures(Dataset):
    """Cached features indexed by whole (H, B) index batches (use with ``batch_size=None``)."""

    def __init__(self, feats: Tensor, labels: Tensor) -> None:
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return self.feats[idx], self.labels[idx]  # (H, B, D), (H, B)


class LinearProbe(Evaluator):
    """Linear probe of a frozen encoder, one head per seed trained side by side.

    The encoder stays in eval mode without gradients; each head is
    :class:`LinearHead` (BatchNorm without affine + linear) trained with LARS,
    ``lr = base_lr x global batch / 256``, warm-up + cosine. With ``cache_features`` the features of
    both splits are extracted once (eval transform, no augmentation) and the heads train on the cached
    tensors, each seed with its own init and data order; otherwise every step encodes augmented
    images (RandomResizedCrop + flip, MAE's recipe) and the heads share the batches. ``fit`` ends by
    scoring every head on the held-out split and writing top-1/top-5 per seed and mean ± std to
    ``<run dir>/<results_file>``.

    Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021 (linear probing).

    Args:
        encoder, model_name, img_size, results_file: see :class:`Evaluator`.
        cache_features: train on features extracted once instead of encoding images every step.
        seeds: one head per seed; results report their mean ± std.
        augment: uncached mode only: RandomResizedCrop(``crop_scale``) + flip (else the eval transform).
        crop_scale: RandomResizedCrop area range.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> probe = LinearProbe("runs/mae/last.ckpt", img_size=224, seeds=[0, 1, 2])
        >>> # python -m ssl_kit fit --config eval/linear.yaml --encoder runs/mae/last.ckpt
    """

    def __init__(
        self,
        encoder: str | None = None,
        model_name: str | None = None,
        img_size: int = 224,
        cache_features: bool = True,
        seeds: tuple[int, ...] = (0,),
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        results_file: str = "linear.json",
        optimizer: OptimizerCallable = lars,
        lr_scaling: bool = True,
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"seeds={list(seeds)} is not allowed: give one or more distinct integers, e.g. [0, 1, 2].")
        super().__init__(encoder, model_name, img_size, results_file, optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.cache_features, self.seeds = cache_features, list(seeds)
        self.augment, self.crop_scale = augment, tuple(crop_scale)
        self.encoder.requires_grad_(False).eval()
        self.heads: nn.ModuleList | None = None
        self._val_cache: tuple[Tensor, Tensor] | None = None
        self.strict_loading = False  # checkpoints hold the heads only; the encoder comes from `encoder`

    # --- data -----------------------------------------------------------------------------
    def train_transform(self) -> Callable:
        if self.augment and not self.cache_features:
            return MaskedImageTransform(self.img_size, scale=self.crop_scale)
        return self.eval_transform()

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.cache_features:
            dim = self._cache_splits()
        else:
            with torch.no_grad():
                dim = self.encoder(torch.zeros(2, 3, self.img_size, self.img_size)).shape[1]
        if self.heads is None:
            self.heads = seeded_heads(dim, self.num_classes, self.seeds)

    def _cache_splits(self) -> int:
        """Encode both splits once; the data module's training loader is swapped for the cache."""
        dm, trainer = self.trainer.datamodule, self.trainer
        device = trainer.strategy.root_device  # setup runs before the module is moved there
        self.encoder.to(device)
        train = self._extract_split(dm.eval_dataloader("train"), device)
        self._val_cache = self._extract_split(dm.eval_dataloader("val"), device)
        sampler = SeededBatches(len(train[1]), dm.batch_size, self.seeds, trainer.global_rank, trainer.world_size)
        loader = DataLoader(CachedFeatures(*train), sampler=sampler, batch_size=None)
        # Only the data module knows the split; the cache replaces its image loader for this fit
        # (Lightning reads the training loader from the data module when one is attached).
        dm.train_dataloader = lambda: loader
        self.print(f"cached features: train {tuple(train[0].shape)}, val {tuple(self._val_cache[0].shape)}")
        return train[0].shape[1]

    def _extract_split(self, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
        """Features of a whole split; under DDP each rank encodes every ``world``-th image and all
        ranks gather the full set (same order as one process)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if world > 1:
            share = Subset(loader.dataset, range(rank, len(loader.dataset), world))
            loader = DataLoader(share, batch_size=loader.batch_size, num_workers=loader.num_workers)
        feats, labels = (t.clone() for t in extract_features(self.encoder, loader, device))  # plain tensors for autograd
        if world == 1:
            return feats, labels
        n, rows = len(share.dataset), -(-len(share.dataset) // world)
        gathered = [self.trainer.strategy.all_gather(F.pad(t.to(device), (0, 0) * (t.ndim - 1) + (0, rows - len(t))))
                    for t in (feats, labels)]  # (world, rows, ...) each
        return tuple(unshard(g, n).cpu() for g in gathered)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm/dropout of the encoder never switch to training
        return self

    def param_groups(self):
        return [{"params": list(self.heads.parameters())}]

    # --- training -------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch
        if x.ndim == 4:  # images (uncached): encode once, every head sees the same batch
            with torch.no_grad():
                f = self.encoder(x)  # (B, D)
            x, y = f.unsqueeze(0).expand(len(self.heads), -1, -1), y.unsqueeze(0).expand(len(self.heads), -1)
        losses = torch.stack([F.cross_entropy(head(x[h].float()), y[h]) for h, head in enumerate(self.heads)])
        self.log_step(losses.mean(), batch_size=y.shape[1])
        return losses.sum()  # heads share no parameter: each gets the gradient of its own loss

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Top-1/top-5 of every head on the held-out split, per seed and mean ± std."""
        if self._val_cache is None:
            dm = self.trainer.datamodule
            self._val_cache = extract_features(self.encoder, dm.eval_dataloader("val"), self.device)
        feats, labels = self._val_cache
        self.heads.eval()
        with torch.no_grad():
            per_seed = {s: topk_accuracy(head(feats.to(self.device)), labels) for s, head in zip(self.seeds, self.heads)}
        return seed_summary(per_seed)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        summary = self.evaluate()
        results = {"protocol": "linear", "encoder": self.encoder_source, "cache_features": self.cache_features,
                   "epochs": self.trainer.current_epoch, "final": summary, **getattr(self, "hparams_extra", {})}
        path = write_results(self.results_path(), results)
        print(format_summary(f"\nlinear probe on the held-out split ({self.encoder_source}):", summary))
        print(f"results written to {path}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        strip_frozen(checkpoint["state_dict"], ["encoder."])


def fit_linear_probe(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], epochs: int = 90, batch_size: int = 256,
    base_lr: float = 0.1, warmup_epochs: float = 10.0, seed: int = 0,
) -> dict[str, float]:
    """:class:`LinearProbe`'s recipe on cached features as a plain loop (no Trainer), for reports
    inside other runs: LARS at ``base_lr x batch / 256``, warm-up + cosine; returns val top-1/5.

    Shapes:
        train, val: (features (N, D), labels (N,))
    """
    (x, y), num_classes = train, int(max(train[1].max(), val[1].max())) + 1
    head = seeded_heads(x.shape[1], num_classes, [seed])[0]
    batch_size = min(batch_size, len(y))
    steps = len(y) // batch_size
    opt = LARS(head.parameters(), lr=base_lr * batch_size / 256)
    total, warmup = epochs * steps, int(warmup_epochs * steps)
    schedule = LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g)[: steps * batch_size].view(steps, batch_size):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    head.eval()
    with torch.no_grad():
        return topk_accuracy(head(val[0]), val[1])

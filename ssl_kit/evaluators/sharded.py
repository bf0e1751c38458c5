"""Feature extraction split across distributed ranks, gathered back in dataset order."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_kit.evaluators.features import extract_features


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def extract_features_sharded(
    encode: Callable[[Tensor], Tensor], dataset: Dataset, batch_size: int, num_workers: int = 0,
    device: torch.device | str = "cpu", bf16: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Features of every item of ``dataset``, each rank encoding the items ``rank::world``
    (``bf16``: as in :func:`extract_features`).

    Without a process group this is :func:`extract_features` over the whole dataset. Under
    one, every rank gets all features in dataset order, identical to the single-process result
    (no item padded or repeated, unlike ``DistributedSampler``). Every rank must call it.

    Shapes:
        returns features (N, D) float32 on CPU and labels (N,) int64, N = len(dataset).
    """
    rank, world = dist_rank_world()
    shard = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    if len(shard):
        feats, labels = extract_features(encode, loader, device, bf16)
    else:  # more ranks than items
        feats, labels = torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    if world == 1:
        return feats, labels
    return _gather_strided(feats, labels, len(dataset), world)


def _gather_strided(feats: Tensor, labels: Tensor, total: int, world: int) -> tuple[Tensor, Tensor]:
    """Undo the ``rank::world`` split: item ``r + i * world`` is row ``i`` of rank ``r``."""
    per_rank = -(-total // world)  # ceil: rank 0 holds the most items
    gather_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if feats.shape[0] == 0:  # a rank with no items (world > total) still needs the width
        width = torch.zeros(1, dtype=torch.long, device=gather_device)
    else:
        width = torch.tensor([feats.shape[1]], device=gather_device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    padded = torch.zeros(per_rank, int(width), device=gather_device)
    padded[: feats.shape[0]] = feats.to(gather_device)
    padded_labels = torch.full((per_rank,), -1, dtype=torch.long, device=gather_device)
    padded_labels[: labels.shape[0]] = labels.to(gather_device)
    all_feats = [torch.empty_like(padded) for _ in range(world)]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(all_feats, padded)
    dist.all_gather(all_labels, padded_labels)
    feats = torch.stack(all_feats, dim=1).flatten(0, 1)[:total]  # (per_rank * world, D) -> (N, D)
    labels = torch.stack(all_labels, dim=1).flatten(0, 1)[:total]  # (N,)
    return feats.cpu(), labels.cpu()

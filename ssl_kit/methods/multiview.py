"""Pieces shared by multi-view (multi-crop, teacher-student) methods: one forward per resolution,
and embeddings gathered over the global batch."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def by_resolution(net: Callable[[Tensor], Tensor], views: list[Tensor]) -> list[Tensor]:
    """Run ``net`` once per run of consecutive equal-resolution views, concatenated, so each
    resolution is one batch (one BatchNorm batch, one kernel launch per layer).

    Shapes:
        views: V x (B, C, H_v, W_v) -> V x (B, D)
    """
    out: list[Tensor] = []
    start = 0
    while start < len(views):
        stop = start
        while stop < len(views) and views[stop].shape[-2:] == views[start].shape[-2:]:
            stop += 1
        out.extend(net(torch.cat(views[start:stop])).chunk(stop - start))  # (stop - start) x (B, D)
        start = stop
    return out


def gather_batch(x: Tensor, with_grad: bool) -> tuple[Tensor, tuple[int, int]]:
    """Concatenate ``x`` from every process in rank order, and this process's row range in it.
    ``with_grad``: gradients flow back to each process's own rows (summed over processes).

    Shapes:
        x: (B, D) -> (world * B, D)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, (0, x.shape[0])
    rank, b = dist.get_rank(), x.shape[0]
    if with_grad:
        from torch.distributed.nn.functional import all_gather  # autograd-aware all-gather

        parts = all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), (rank * b, rank * b + b)

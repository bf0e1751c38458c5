"""Pieces shared by multi-view (multi-crop, teacher-student) methods: one forward per resolution,
and embeddings gathered over the global batch."""

from __future__ import annotations

from typing import Any, Callable

import timm
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssl_kit.backbones.vit import check_timm_name
from ssl_kit.errors import UserError


def multicrop_encoder(model_name: str, encoder_kwargs: dict[str, Any] | None, small_crops: int, small_size: int,
                      small_option: str) -> tuple[nn.Module, tuple[str, dict[str, Any]]]:
    """A timm encoder (``num_classes=0``) and its spec for a method fed crops of two sizes; an
    encoder with a fixed input size (a ViT without ``dynamic_img_size``) is refused when there are
    small crops, naming ``small_option``, the method's option that turns them off."""
    check_timm_name(model_name)
    kwargs = dict(encoder_kwargs or {})
    encoder = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    if small_crops > 0 and hasattr(encoder, "patch_embed") and not getattr(encoder, "dynamic_img_size", True):
        raise UserError(f"{model_name!r} has a fixed input size but the small crops are {small_size} px: "
                        f"add encoder_kwargs {{dynamic_img_size: true}} (or set {small_option}: 0).")
    return encoder, (model_name, kwargs)


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

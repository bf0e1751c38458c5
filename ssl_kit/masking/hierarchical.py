"""FCMAE's mask: random patches at a network's total stride, the same mask upsampled at every stage.

ConvNeXt V2 (Woo et al., 2023, arXiv:2301.00808), Sec. 3: a random 60% of the 32x32 patches is
removed and the mask is upsampled to the resolution of each stage (stride 4, 8, 16, 32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_kit.masking.random import random_masking


def random_grid_mask(
    grid: tuple[int, int],
    mask_ratio: float,
    batch_size: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Remove the same number of random cells, ``L - int(L * (1 - mask_ratio))``, from each image.

    Args:
        grid: (h, w) patch grid, e.g. (7, 7) for 224 px at stride 32.
        mask_ratio: fraction of patches removed, in [0, 1).
        batch_size: B.
        device: where the mask lives.
        generator: optional RNG for reproducible masks.

    Shapes:
        returns (B, h, w) float, 0 = keep, 1 = removed.
    """
    h, w = grid
    _, mask, _ = random_masking(h * w, mask_ratio, batch_size, device=device, generator=generator)
    return mask.reshape(batch_size, h, w)  # (B, h, w)


def upsample_mask(mask: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling: every cell becomes a ``factor x factor`` block.

    Shapes:
        mask: (B, h, w) -> (B, h * factor, w * factor)
    """
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def kept_indices(mask: Tensor) -> Tensor:
    """Raster indices of the kept cells of each image, in ascending order.

    Every image must keep the same number K of cells (as :func:`random_grid_mask` guarantees),
    so that the visible positions of a batch form a regular (B, K) tensor.

    Shapes:
        mask: (B, h, w) -> (B, K)
    """
    flat = mask.flatten(1)  # (B, L)
    kept = (flat == 0).sum(dim=1)
    if not bool((kept == kept[0]).all()):
        raise ValueError(f"every image must keep the same number of cells; got {kept.tolist()}.")
    # A stable sort puts the kept (0) cells first, in raster order.
    return torch.argsort(flat, dim=1, stable=True)[:, : int(kept[0])]  # (B, K)

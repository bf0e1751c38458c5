"""Per-sample random masking by argsort of uniform noise (MAE, He et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ssl_kit.errors import UserError


def check_mask_ratio(mask_ratio: float) -> float:
    """Raise unless ``0 < mask_ratio < 1`` (used by every masked method's constructor)."""
    if not 0.0 < float(mask_ratio) < 1.0:
        raise UserError(f"mask_ratio={mask_ratio!r} is not allowed: it must lie strictly between 0 and 1.")
    return float(mask_ratio)


def random_masking(
    num_patches: int,
    mask_ratio: float,
    batch_size: int,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw an independent random mask for every sample.

    ``ids_shuffle = argsort(noise)``; the first ``K = int(L * (1 - mask_ratio))`` indices are kept,
    and ``ids_restore = argsort(ids_shuffle)`` undoes the shuffle.

    Args:
        num_patches: L, patches per image.
        mask_ratio: fraction of patches removed, in (0, 1).
        batch_size: B.
        device: where the indices live.
        generator: optional RNG for reproducible masks.

    Returns:
        ``(ids_keep, mask, ids_restore)``.

    Shapes:
        ids_keep: (B, K) indices of kept patches, in shuffled order.
        mask: (B, L) float, 0 = keep, 1 = removed, in the original patch order.
        ids_restore: (B, L) with ``ids_shuffle.gather(1, ids_restore) == arange(L)``.
    """
    len_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # (B, L)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L) ascending noise: small is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L) back in patch order
    return ids_keep, mask, ids_restore


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample.

    Shapes:
        x: (B, L, D); ids: (B, K) -> (B, K, D)
    """
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

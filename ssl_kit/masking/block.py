"""Block-wise masking (BEiT, Bao et al. 2021, arXiv:2106.08254), as EVA uses it.

Rectangular blocks of at least ``min_num_patches`` patches with aspect ratio in
``[min_aspect, 1 / min_aspect]`` are added at random places until the mask reaches the target
number of patches. Block sides are rounded (as BEiT) and clamped to the grid. A block is accepted only if it adds
at least one patch and does not overshoot the target; after ``max_attempts`` rejected proposals in a row a sample stops, so a mask can end
slightly below the target (as in BEiT). Masks are drawn for the whole batch at once: every
unfinished sample proposes one block per round.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from ssl_kit.errors import UserError


def check_block_masking(grid: tuple[int, int], mask_ratio: float, min_num_patches: int, min_aspect: float) -> int:
    """Validate the arguments of :func:`block_masking` and return the target number of masked patches."""
    if not 0.0 < float(mask_ratio) < 1.0:
        raise UserError(f"mask_ratio={mask_ratio!r} is not allowed: it must lie strictly between 0 and 1.")
    if not 0.0 < min_aspect <= 1.0:
        raise UserError(f"min_aspect={min_aspect!r} is not allowed: use 0 < min_aspect <= 1 (BEiT: 0.3).")
    if min_num_patches < 1:
        raise UserError(f"min_num_patches={min_num_patches!r} is not allowed: it must be >= 1 (BEiT: 16).")
    h, w = grid
    target = int(round(mask_ratio * h * w))
    if target < min_num_patches:
        raise UserError(
            f"mask_ratio={mask_ratio} of a {h}x{w} grid is {target} patches, fewer than one block of "
            f"min_num_patches={min_num_patches}: lower min_num_patches or raise mask_ratio."
        )
    return target


def block_masking(
    grid: tuple[int, int],
    mask_ratio: float,
    batch_size: int,
    min_num_patches: int = 16,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw an independent block-wise mask for every sample.

    Args:
        grid: (h, w) patch grid.
        mask_ratio: target fraction of masked patches, in (0, 1) (EVA: 0.4).
        batch_size: B.
        min_num_patches: smallest block, in patches (BEiT: 16).
        min_aspect: block aspect ratios lie in ``[min_aspect, 1 / min_aspect]`` (BEiT: 0.3).
        max_attempts: rejected proposals in a row after which a sample stops short of the target.
        device: where the mask is built (small; the CPU is usually fastest).
        generator: optional RNG for reproducible masks.

    Returns:
        Float mask, 1 = masked (replaced by the mask token), 0 = kept.

    Shapes:
        returns (B, L) with L = h * w, in raster order.
    """
    h, w = grid
    target = check_block_masking(grid, mask_ratio, min_num_patches, min_aspect)
    mask = torch.zeros(batch_size, h, w, dtype=torch.bool, device=device)
    remaining = torch.full((batch_size,), target, device=device)
    fails = torch.zeros(batch_size, dtype=torch.long, device=device)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    log_aspect = math.log(min_aspect)
    while True:
        active = (remaining > 0) & (fails < max_attempts)
        if not active.any():
            break
        u = torch.rand(batch_size, 4, device=device, generator=generator)  # (B, 4)
        # uniform(min_num_patches, remaining) as BEiT draws it, also when remaining < min_num_patches
        area = min_num_patches + u[:, 0] * (remaining - min_num_patches)
        aspect = torch.exp(log_aspect * (1 - 2 * u[:, 1]))  # log-uniform in [min_aspect, 1/min_aspect]
        # Rounded sides, as BEiT: ceil would overshoot the area, so on small grids the last blocks
        # rarely fit under the remaining count and masks stopped short of the target. Sides are
        # clamped to the grid (BEiT redraws instead) so every proposal can be placed.
        bh = torch.sqrt(area * aspect).round().long().clamp(1, h)
        bw = torch.sqrt(area / aspect).round().long().clamp(1, w)
        top = (u[:, 2] * (h - bh + 1).clamp_min(1)).long().view(-1, 1, 1)
        left = (u[:, 3] * (w - bw + 1).clamp_min(1)).long().view(-1, 1, 1)
        block = (rows >= top) & (rows < top + bh.view(-1, 1, 1)) & (cols >= left) & (cols < left + bw.view(-1, 1, 1))
        new = (block & ~mask).sum(dim=(1, 2))  # (B,)
        accept = active & (new > 0) & (new <= remaining)
        mask |= block & accept.view(-1, 1, 1)
        remaining = remaining - new * accept
        fails = torch.where(accept, torch.zeros_like(fails), fails + active.long())
    return mask.flatten(1).float()  # (B, L)

"""Masks for masked-image-modelling methods. Convention everywhere: 0 = keep, 1 = removed."""

from ssl_kit.masking.block import block_masking
from ssl_kit.masking.hierarchical import random_grid_mask, upsample_mask
from ssl_kit.masking.random import random_masking

__all__ = ["random_masking", "random_grid_mask", "upsample_mask", "block_masking"]

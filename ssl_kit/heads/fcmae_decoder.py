"""FCMAE's decoder: mask tokens on the last-stage map, ConvNeXt V2 block(s), 1x1 conv to pixels."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.convnext import ConvNeXtBlock
from torch import Tensor, nn


class FCMAEDecoder(nn.Module):
    """Projects the encoder's last-stage map to the decoder width, fills removed cells with a
    learned mask token, runs ConvNeXt V2 blocks (timm's, with GRN and no layer scale) and
    predicts each cell's patch of pixels with a 1x1 conv.

    ConvNeXt V2 (Woo et al., 2023, arXiv:2301.00808), Sec. 3.

    Args:
        in_dim: encoder width at the last stage.
        patch_dim: P = p*p*C pixels predicted per cell (p = the encoder's total stride).
        embed_dim: decoder width (paper: 512).
        depth: decoder blocks (paper: 1).

    Examples:
        >>> dec = FCMAEDecoder(in_dim=320, patch_dim=32 * 32 * 3, embed_dim=64)
        >>> pred = dec(torch.randn(2, 320, 2, 2), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]] * 2))  # (2, 4, 3072)
    """

    def __init__(self, in_dim: int, patch_dim: int, embed_dim: int = 512, depth: int = 1) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, 1, 1))
        self.blocks = nn.Sequential(
            *[ConvNeXtBlock(embed_dim, use_grn=True, ls_init_value=None, conv_mlp=False) for _ in range(depth)]
        )
        self.pred = nn.Conv2d(embed_dim, patch_dim, kernel_size=1)
        self.apply(_init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Predict the pixels of every cell, raster order.

        Shapes:
            x: (B, D_enc, h, w), zero at removed cells; mask: (B, h, w), 1 = removed -> (B, L, P)
        """
        x = self.proj(x)  # (B, D, h, w)
        m = mask.unsqueeze(1).to(x.dtype)  # (B, 1, h, w)
        x = x * (1 - m) + self.mask_token * m
        x = self.pred(self.blocks(x))  # (B, P, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, L, P)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

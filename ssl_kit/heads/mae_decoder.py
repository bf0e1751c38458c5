"""MAE's lightweight Transformer decoder (He et al., 2021, Sec. 3)."""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ssl_kit.backbones.vit import sincos_pos_embed_2d


class MAEDecoder(nn.Module):
    """Embeds visible encoder tokens, appends mask tokens, unshuffles, and predicts each patch's pixels.

    Args:
        in_dim: encoder width.
        grid: (h, w) patch grid.
        patch_dim: P = p*p*C, pixels predicted per patch.
        embed_dim: decoder width (paper: 512).
        depth: decoder blocks (paper: 8; 1 is nearly as good for fine-tuning).
        num_heads: decoder attention heads.
        mlp_ratio: MLP expansion.
        num_prefix_tokens: prefix tokens (cls/registers) the encoder output starts with.

    Examples:
        >>> dec = MAEDecoder(in_dim=192, grid=(8, 8), patch_dim=48, embed_dim=128, depth=1, num_heads=4)
    """

    def __init__(
        self,
        in_dim: int,
        grid: tuple[int, int],
        patch_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(in_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        pos = torch.zeros(1, num_prefix_tokens + grid[0] * grid[1], embed_dim)
        pos[0, num_prefix_tokens:] = sincos_pos_embed_2d(embed_dim, *grid)
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed, rebuilt from the grid
        self.blocks = nn.Sequential(
            *[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pred = nn.Linear(embed_dim, patch_dim)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict pixels for every patch.

        Shapes:
            x: (B, n_prefix + K, D_enc); ids_restore: (B, L) -> (B, L, P)
        """
        x = self.embed(x)  # (B, n_prefix + K, D)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, K, D = visible.shape
        L = ids_restore.shape[1]
        masks = self.mask_token.expand(B, L - K, D)  # (B, L - K, D)
        shuffled = torch.cat([visible, masks], dim=1)  # (B, L, D) in shuffled order
        tokens = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))  # (B, L, D)
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed  # (B, n_prefix + L, D)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix_tokens :])  # (B, L, P)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

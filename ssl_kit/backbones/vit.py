"""timm Vision Transformers with MAE's fixed sin-cos position embedding and the masked forwards:
visible tokens only (MAE) or every token with a mask token in place of the masked ones (EVA)."""

from __future__ import annotations

import math

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_kit.checkpoints.timm_names import check_timm_name
from ssl_kit.errors import UserError
from ssl_kit.masking.random import gather_tokens


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding: half the channels encode the row, half the column.

    Shapes:
        returns (grid_h * grid_w, embed_dim), rows in raster order.
    """
    if embed_dim % 4:
        raise UserError(f"embed_dim={embed_dim} must be divisible by 4 for a 2-D sin-cos embedding.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (L, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (L, D)


def set_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Replace a timm ViT's learned position embedding with MAE's frozen sin-cos one (prefix slots 0)."""
    grid_h, grid_w = vit.patch_embed.grid_size
    table = sincos_pos_embed_2d(vit.embed_dim, grid_h, grid_w)  # (L, D)
    n_prefix = vit.pos_embed.shape[1] - table.shape[0]
    with torch.no_grad():
        vit.pos_embed.zero_()
        vit.pos_embed[0, n_prefix:] = table
    vit.pos_embed.requires_grad_(False)


def create_vit(
    model_name: str,
    img_size: int = 224,
    patch_size: int | None = None,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    sincos_pos_embed: bool = True,
    **kwargs,
) -> VisionTransformer:
    """Build a randomly initialised timm ViT without classifier, checking names and sizes first.

    Args:
        model_name: any timm ``VisionTransformer`` name, e.g. ``vit_base_patch16_224``.
        img_size: input resolution; must be divisible by the patch size.
        patch_size: overrides the name's patch size when given.
        in_chans: input channels.
        drop_path_rate: stochastic depth.
        sincos_pos_embed: use MAE's fixed 2-D sin-cos position embedding.
        **kwargs: passed to ``timm.create_model`` (e.g. ``global_pool``).
    """
    check_timm_name(model_name)
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    not_a_vit = ValueError(f"{model_name!r} is not a timm VisionTransformer; MAE and EVA need a plain ViT (vit_* names).")
    try:
        model = timm.create_model(
            model_name, pretrained=False, num_classes=0, img_size=img_size, in_chans=in_chans,
            drop_path_rate=drop_path_rate, **kwargs,
        )
    except TypeError as err:  # a non-ViT constructor rejects img_size / patch_size
        raise not_a_vit from err
    if not isinstance(model, VisionTransformer):
        raise not_a_vit
    p = model.patch_embed.patch_size[0]
    if img_size % p:
        raise UserError(f"img_size={img_size} is not divisible by patch_size={p}; choose a multiple of {p}.")
    if sincos_pos_embed:
        set_sincos_pos_embed(model)
    return model


def mae_init_(vit: VisionTransformer) -> VisionTransformer:
    """Re-initialise a timm ViT as the MAE paper's code does (timm's default differs): every Linear
    xavier-uniform with zero bias, the patch embedding xavier-uniform as a (D, p*p*C) matrix,
    LayerNorms (1, 0), class/register tokens normal(std 0.02). Position embeddings are left as
    they are (fixed sin-cos). Returns ``vit``.
    """
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    proj = vit.patch_embed.proj.weight
    nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))  # (D, C*p*p): as the linear it is
    for name in ("cls_token", "reg_token"):
        token = getattr(vit, name, None)
        if isinstance(token, nn.Parameter):
            nn.init.normal_(token, std=0.02)
    return vit


def forward_visible(vit: VisionTransformer, imgs: Tensor, ids_keep: Tensor) -> Tensor:
    """Run the encoder on the kept patches only (plus its prefix tokens); no mask token enters.

    Position embeddings are added before the removed patches are dropped, so each kept token
    still knows where it sits.

    Shapes:
        imgs: (B, C, H, W); ids_keep: (B, K) -> (B, n_prefix + K, D), after the final norm.
    """
    x = vit.patch_embed(imgs)  # (B, L, D)
    x = vit._pos_embed(x)  # (B, n_prefix + L, D)
    n_prefix = vit.num_prefix_tokens
    visible = gather_tokens(x[:, n_prefix:], ids_keep)  # (B, K, D)
    x = torch.cat([x[:, :n_prefix], visible], dim=1)  # (B, n_prefix + K, D)
    x = vit.norm_pre(x)
    x = vit.blocks(x)
    return vit.norm(x)


def forward_mask_token(vit: VisionTransformer, imgs: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """Run the encoder on the whole sequence, the masked patch embeddings replaced by ``mask_token``.

    The swap happens before the position embeddings are added, so a mask token still knows
    where it sits; a masked patch's pixels reach no output.

    Shapes:
        imgs: (B, C, H, W); mask: (B, L), 1 = masked; mask_token: (1, 1, D)
        -> (B, n_prefix + L, D), after the final norm.
    """
    x = vit.patch_embed(imgs)  # (B, L, D)
    w = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
    x = x * (1 - w) + mask_token.to(x.dtype) * w
    x = vit._pos_embed(x)  # (B, n_prefix + L, D)
    x = vit.blocks(vit.norm_pre(x))
    return vit.norm(x)


def num_patches(vit: VisionTransformer) -> int:
    """L, the number of patch tokens of ``vit`` at its configured resolution."""
    return math.prod(vit.patch_embed.grid_size)


def patch_size_of(vit: nn.Module) -> int:
    return vit.patch_embed.patch_size[0]

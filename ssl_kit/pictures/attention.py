"""Class-token attention of a ViT's last block, one map per head (DINO's figure)."""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor, nn

from ssl_kit.pictures.canvas import colormap, denormalise, labelled_grid, to_pil
from ssl_kit.pictures.pca import is_vit, token_grid


def last_attention_module(encoder: nn.Module) -> nn.Module | None:
    """The last block's attention module if it is timm's ``Attention`` (``fused_attn`` and
    ``attn_drop``, through which the attention weights pass); else None."""
    blocks = getattr(encoder, "blocks", None)
    if not is_vit(encoder) or blocks is None or len(blocks) == 0:
        return None
    attn = getattr(blocks[-1], "attn", None)
    if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        return None
    return attn


@torch.no_grad()
def attention_maps(encoder: nn.Module, imgs: Tensor) -> tuple[Tensor, str]:
    """Attention of the last block per head: from the class token to every patch, or, for a ViT
    without one, the attention each patch receives averaged over all patch queries.

    The weights are read where timm computes them (the input of ``attn_drop`` on the unfused
    path, which the fused kernel skips), so they are exactly the model's.

    Returns the maps and which query they show (``class token`` or ``mean over patches``).

    Shapes:
        imgs: (B, C, H, W) -> (B, heads, h, w)
    """
    attn_module = last_attention_module(encoder)
    if attn_module is None:
        raise ValueError(f"{type(encoder).__name__} has no timm ViT attention to read")
    captured: list[Tensor] = []
    hook = attn_module.attn_drop.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    fused, attn_module.fused_attn = attn_module.fused_attn, False
    try:
        encoder.forward_features(imgs)
    finally:
        hook.remove()
        attn_module.fused_attn = fused
    weights = captured[-1]  # (B, heads, N, N), rows: queries
    n_prefix = encoder.num_prefix_tokens
    if getattr(encoder, "cls_token", None) is not None:
        maps, query = weights[:, :, 0, n_prefix:], "class token"  # (B, heads, L)
    else:
        maps, query = weights[:, :, n_prefix:, n_prefix:].mean(2), "mean over patches"  # (B, heads, L)
    h, w = token_grid(encoder, imgs)
    return maps.reshape(*maps.shape[:2], h, w), query  # (B, heads, h, w)


def attention_picture(encoder: nn.Module, imgs: Tensor, tile: int = 64) -> tuple[Image.Image, str]:
    """Rows: the images, then one attention map per head (each scaled to its own maximum).

    Shapes:
        imgs: (B, 3, H, W), normalised as ssl_kit's evaluation transform does.
    """
    maps, query = attention_maps(encoder, imgs)  # (B, heads, h, w)
    peak = maps.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]  # (B, heads, 1, 1)
    coloured = colormap(maps / peak).permute(0, 1, 4, 2, 3)  # (B, heads, 3, h, w)
    rows = [[to_pil(im, tile) for im in denormalise(imgs)]]
    rows += [[to_pil(coloured[b, head], tile) for b in range(maps.shape[0])] for head in range(maps.shape[1])]
    labels = ["image"] + [f"head {i + 1}" for i in range(maps.shape[1])]
    note = f"last block, {query} -> patches, {maps.shape[1]} heads"
    return labelled_grid(rows, labels, title=f"Attention ({note})"), note

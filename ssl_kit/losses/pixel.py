"""Pixel-regression pieces shared by MAE and FCMAE: patchify, normalised targets, masked MSE."""

from __future__ import annotations

from torch import Tensor


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches in raster order.

    Shapes:
        imgs: (B, C, H, W) -> (B, L, P) with L = (H/p)(W/p), P = p*p*C ordered (p, p, C).
    """
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(patches: Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`.

    Shapes:
        patches: (B, L, P) -> (B, C, h*p, w*p) with (h, w) = grid.
    """
    B = patches.shape[0]
    p = patch_size
    h, w = grid
    x = patches.reshape(B, h, w, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, h * p, w * p)


def pixel_targets(imgs: Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6) -> Tensor:
    """Per-patch regression targets; with ``norm_pix`` each patch is standardised by its own statistics.

    Shapes:
        imgs: (B, C, H, W) -> (B, L, P)
    """
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as in the MAE paper's code
        target = (target - mean) / (var + eps) ** 0.5
    return target


def predictions_to_image(pred: Tensor, imgs: Tensor, patch_size: int, norm_pix: bool, eps: float = 1e-6) -> Tensor:
    """Inverse of :func:`pixel_targets` for predictions: undo each patch's normalisation with the
    statistics of ``imgs`` (when ``norm_pix``) and reassemble the image.

    Shapes:
        pred: (B, L, P); imgs: (B, C, H, W) -> (B, C, H, W)
    """
    if norm_pix:
        patches = patchify(imgs, patch_size)  # (B, L, P)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        pred = pred * (var + eps) ** 0.5 + mean
    grid = (imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size)
    return unpatchify(pred.float(), patch_size, grid, imgs.shape[1])


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over removed patches only (mask: 1 = removed).

    Shapes:
        pred, target: (B, L, P); mask: (B, L) -> scalar
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

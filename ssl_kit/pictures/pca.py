"""PCA of patch features mapped to RGB (DINOv2's figure): ViT patch tokens or a CNN's final feature map."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA
from torch import Tensor, nn

from ssl_kit.pictures.canvas import denormalise, labelled_grid, to_pil

#: A CNN whose final map is smaller than this (a ResNet at 32 px has 1x1) is shown on an enlarged input.
MIN_CELLS = 8

#: Components whose spread is below this share of the first one's are not stretched to full range.
MIN_SPREAD = 0.1

#: Images the PCA is fitted on (the grid shows the first few): enough to estimate each location's mean.
PCA_IMAGES = 64


def is_vit(encoder: nn.Module) -> bool:
    """A timm ViT-like model: patch embedding plus prefix tokens, features as tokens."""
    return hasattr(encoder, "patch_embed") and hasattr(encoder, "num_prefix_tokens")


def patch_features(encoder: nn.Module, imgs: Tensor) -> Tensor:
    """The encoder's final per-location features as a map: ViT patch tokens (prefix tokens
    dropped) laid out on the patch grid, or a CNN's last feature map.

    Shapes:
        imgs: (B, C, H, W) -> (B, D, h, w)
    """
    out = encoder.forward_features(imgs)
    if out.ndim == 3:  # tokens: prefix (class, registers) first, then patches row by row
        patches = out[:, getattr(encoder, "num_prefix_tokens", 0):]  # (B, L, D)
        h, w = token_grid(encoder, imgs)
        if patches.shape[1] != h * w:
            raise ValueError(f"{patches.shape[1]} patch tokens do not fill the {h}x{w} patch grid")
        return patches.transpose(1, 2).reshape(out.shape[0], -1, h, w)  # (B, D, h, w)
    if out.ndim == 4:
        width = getattr(encoder, "num_features", out.shape[1])
        if out.shape[1] != width and out.shape[-1] == width:  # channels-last models (Swin-style)
            out = out.permute(0, 3, 1, 2)  # (B, D, h, w)
        return out
    raise ValueError(f"forward_features returned shape {tuple(out.shape)}: not tokens or a feature map")


def token_grid(encoder: nn.Module, imgs: Tensor) -> tuple[int, int]:
    """Patch grid (h, w) of a ViT for these images."""
    p = encoder.patch_embed.patch_size
    ph, pw = (p, p) if isinstance(p, int) else p
    return imgs.shape[-2] // ph, imgs.shape[-1] // pw


def pca_input_size(encoder: nn.Module, img_size: int, size: int | None = None) -> int:
    """Input side for the PCA picture: ``size`` if given; a ViT's own size; for a CNN the
    smallest multiple of ``img_size`` whose final map has at least :data:`MIN_CELLS` per side."""
    if size:
        return size
    if is_vit(encoder):
        return img_size
    stride = _total_stride(encoder, img_size)
    return img_size * max(1, math.ceil(MIN_CELLS * stride / img_size))


def _total_stride(encoder: nn.Module, img_size: int) -> int:
    info = getattr(encoder, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError):
        with torch.no_grad():
            param = next(encoder.parameters())
            probe = torch.zeros(1, 3, img_size, img_size, device=param.device, dtype=param.dtype)
            return max(1, img_size // patch_features(encoder, probe).shape[-1])


def pca_rgb(feats: Tensor, centre_locations: bool = True) -> Tensor:
    """The first three principal components of all locations of all images, as RGB in [0, 1].

    The components are fitted jointly over every image, so one colour means one direction of
    feature space across the grid. With ``centre_locations`` (and two images or more) each
    location's mean over the images is removed first: what every image shares at a location is
    mostly the position embedding (and a common background), which otherwise takes the first
    components and paints every image with the same position gradient (seen on the MAE demo).
    Each component is stretched between its 1st and 99th percentiles; components with almost no
    spread (below :data:`MIN_SPREAD` of the first's) are not stretched, so they stay flat
    instead of showing amplified noise.

    Shapes:
        feats: (B, D, h, w) -> (B, 3, h, w)
    """
    B, D, h, w = feats.shape
    feats = feats.detach().double()
    if centre_locations and B > 1:
        feats = feats - feats.mean(0, keepdim=True)  # (B, D, h, w): per-location mean over images removed
    x = feats.permute(0, 2, 3, 1).reshape(-1, D).cpu().numpy()  # (B*h*w, D)
    n = min(3, D, x.shape[0])
    comps = PCA(n_components=n).fit_transform(x)  # (B*h*w, n)
    lo, hi = np.percentile(comps, [1, 99], axis=0)
    spread = np.maximum(hi - lo, max(MIN_SPREAD * (hi[0] - lo[0]), 1e-12))
    rgb = np.clip((comps - lo) / spread, 0, 1)
    rgb = np.concatenate([rgb, np.zeros((rgb.shape[0], 3 - n))], axis=1)  # (B*h*w, 3)
    return torch.from_numpy(rgb).float().reshape(B, h, w, 3).permute(0, 3, 1, 2)  # (B, 3, h, w)


@torch.no_grad()
def pca_picture(encoder: nn.Module, imgs: Tensor, size: int | None = None, tile: int = 64,
                num_shown: int | None = None) -> tuple[Image.Image, str]:
    """Rows: the images, then the PCA of their patch features (enlarged to the image tile).

    The PCA is fitted on every image of ``imgs`` (see :func:`pca_rgb`); the grid shows the first
    ``num_shown`` (default: all). Returns the picture and a one-line description.

    Shapes:
        imgs: (B, 3, H, W), normalised as ssl_kit's evaluation transform does.
    """
    side = pca_input_size(encoder, imgs.shape[-1], size)
    x = imgs if side == imgs.shape[-1] else F.interpolate(imgs, size=(side, side), mode="bicubic", align_corners=False)
    feats = patch_features(encoder, x).float()  # (B, D, h, w)
    shown = slice(0, num_shown or imgs.shape[0])
    rgb = pca_rgb(feats)[shown]  # (num_shown, 3, h, w)
    rows = [[to_pil(im, tile) for im in denormalise(imgs[shown])], [to_pil(c, tile) for c in rgb]]
    h, w = feats.shape[-2:]
    centred = ", each location centred" if imgs.shape[0] > 1 else ""
    note = f"{h}x{w} locations of {feats.shape[1]}-d features at {side} px input, fitted on {imgs.shape[0]} images{centred}"
    title = f"PCA of patch features ({h}x{w} at {side} px, fitted on {imgs.shape[0]} images)"
    return labelled_grid(rows, ["image", "PCA"], title=title), note

"""Drawing with Pillow only (no matplotlib): image tensors to tiles, labelled grids, colour maps."""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD

#: Anchor colours of matplotlib's viridis colour map (dark blue -> yellow), interpolated linearly.
VIRIDIS = np.array([(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)], np.float64)

#: matplotlib's ``tab10`` palette: the first ten label colours.
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
         (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` px (its fixed bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def denormalise(x: Tensor) -> Tensor:
    """Undo ssl_kit's ImageNet normalisation, clamped to [0, 1].

    Shapes:
        x: (B, 3, H, W) -> (B, 3, H, W)
    """
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


def to_pil(x: Tensor, size: int | None = None) -> Image.Image:
    """One RGB image in [0, 1] as a PIL image, optionally enlarged to ``size`` (nearest: cells stay crisp).

    Shapes:
        x: (3, H, W)
    """
    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()  # (H, W, 3)
    img = Image.fromarray(arr, "RGB")
    return img.resize((size, size), Image.NEAREST) if size else img


def colormap(values: Tensor) -> Tensor:
    """Map values in [0, 1] to viridis RGB in [0, 1].

    Shapes:
        values: (...) -> (..., 3)
    """
    v = values.detach().float().cpu().clamp(0, 1).numpy() * (len(VIRIDIS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac
    return torch.from_numpy(rgb / 255.0).float()


def label_colour(label: int) -> tuple[int, int, int]:
    """tab10 for the first ten labels, then evenly spread hues."""
    if label < len(TAB10):
        return TAB10[label]
    hue = (label * 0.618034) % 1.0  # golden-ratio steps keep neighbouring labels apart
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.75, 0.85))


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], title: str = "", pad: int = 2) -> Image.Image:
    """Tiles in rows (all the same size) with a label left of each row and a title above."""
    f = font(12)
    tile_w, tile_h = rows[0][0].size
    label_w = max(int(f.getlength(text)) for text in row_labels) + 8 if row_labels else 0
    title_h = 18 if title else 0
    cols = max(len(r) for r in rows)
    width = label_w + cols * (tile_w + pad) + pad
    height = title_h + len(rows) * (tile_h + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=TEXT, font=f)
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = title_h + pad + r * (tile_h + pad)
        draw.text((2, y + tile_h // 2 - 6), text, fill=TEXT, font=f)
        for c, tile in enumerate(row):
            canvas.paste(tile, (label_w + pad + c * (tile_w + pad), y))
    return canvas

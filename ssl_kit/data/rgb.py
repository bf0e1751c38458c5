"""Any PIL-readable image as 8-bit RGB: the one conversion the folder, shard and fast-decode paths share."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

from ssl_kit.errors import BadImageError

#: Background that transparent pixels are composited onto (alpha, LA, palette transparency).
ALPHA_BACKGROUND = (255, 255, 255)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB; the error names the file it could not read.

    EXIF rotation is applied; grayscale, CMYK and palette images are converted; transparent pixels
    are composited onto white; 16-bit and 32-bit images are scaled to 0-255 (not clipped).
    Truncated, empty and non-image files raise :class:`~ssl_kit.errors.BadImageError` (an ``OSError``).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:  # PIL raises many types for broken files
        raise BadImageError(f"cannot read image {str(path)!r}: {err}") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see :func:`open_rgb`)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale to 8-bit ``L``, scaled by the bit depth the values use."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0 if a.size and np.nanmax(a) <= 255.0 else 65535.0
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        top = 65535.0  # 16-bit data (PIL opens 16-bit PNG/TIFF as I;16 or I)
    else:
        top = 255.0
    a = np.nan_to_num(a, nan=0.0) / top * 255.0
    return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))  # (H, W) uint8 -> L

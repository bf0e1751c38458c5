"""Fast decode for random-resized crops: read the JPEG header, draw the crop, decode only as much as it needs.

The plain path (``open_rgb`` + torchvision's ``RandomResizedCrop`` on a PIL image) decodes every
pixel at full size, copies the crop out and resizes it with PIL. :class:`RandomResizedCropFlip`
draws the same crop box from the same RNG calls, then

* decodes at 1/2, 1/4 or 1/8 size (libjpeg's DCT scaling, PIL ``Image.draft``) when the crop is
  shrunk by at least that factor anyway, so the reduced crop still has at least the output size
  (at quality 90 this saves less than one might hope: entropy decoding, which scaling does not
  shorten, is most of a decode; the smaller resize is the larger gain);
* otherwise decodes with libjpeg-turbo straight into a tensor (``torchvision.io.decode_jpeg``);
* crops a view of the decoded pixels (no copy) and resizes it with PyTorch's uint8 bicubic
  antialiased kernel (the same filter as PIL's bicubic, ~4x faster), then flips and normalises
  in one pass.

Outputs are statistically equivalent to the plain path (``tests/test_decode.py``); the pixels of
a view differ by rounding (and, for DCT-scaled decodes, by the decoder's own downsampling).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision.io import ImageReadMode

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; PIL decodes if it goes away
    from torchvision.io import decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None
from torchvision.transforms.v2 import functional as TF

from ssl_kit.data.rgb import to_rgb
from ssl_kit.errors import BadImageError

#: EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPS_SIDES = (5, 6, 7, 8)
_ORIENTATION = 0x0112
#: JPEG end-of-image marker: a file without it is truncated and goes through PIL (which says so).
_EOI = b"\xff\xd9"
#: DCT scale factors libjpeg offers through PIL's draft mode, largest first.
DCT_SCALES = (8, 4, 2)


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Decode any PIL-readable image from bytes as 8-bit RGB (EXIF rotation applied, modes converted).

    Raises:
        OSError: naming ``name`` when the bytes are not a readable image (truncated, empty, other).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as err:  # PIL raises many types for broken files
        raise BadImageError(f"cannot read image {name!r}: {err}") from err


def pil_to_tensor(img: Image.Image) -> Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor (a channels-last view of one writable copy)."""
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)  # (H, W, 3)
    return hwc.permute(2, 0, 1)  # (3, H, W)


class EncodedImage:
    """A baseline/progressive RGB or grayscale JPEG, header read, pixels not yet decoded.

    ``size`` is the upright (EXIF-rotated) ``(width, height)`` like a PIL image's; ``info`` carries
    side data (``relpath``). Build it with :meth:`open`, which returns a decoded PIL image instead
    for anything else (other formats, CMYK, truncated files), so those keep the plain path.

    Args:
        data: the file's bytes.
        name: shown in errors (file path, or ``shard:key``).
        stored_size: ``(width, height)`` as stored, before EXIF rotation.
        orientation: EXIF orientation tag (1 = upright).
        info: side data, e.g. ``{"relpath": "n01/img.JPEG"}``.
    """

    def __init__(self, data: bytes, name: str, stored_size: tuple[int, int], orientation: int = 1,
                 info: dict | None = None) -> None:
        self.data, self.name, self.stored_size, self.orientation = data, name, stored_size, orientation
        w, h = stored_size
        self.size = (h, w) if orientation in _SWAPS_SIDES else (w, h)
        self.info = dict(info or {})
        self._decoded: dict = {}  # DCT scale -> pixels (1: (3, H, W) tensor, >1: reduced PIL); views share them

    @classmethod
    def open(cls, data: bytes, name: str, info: dict | None = None) -> "EncodedImage | Image.Image":
        """An :class:`EncodedImage` when the fast path can decode ``data``, else the decoded PIL image.

        Raises:
            OSError: naming ``name`` when the bytes are not a readable image.
        """
        try:
            img = Image.open(io.BytesIO(data))
            fmt, mode, size = img.format, img.mode, img.size
            orientation = img.getexif().get(_ORIENTATION, 1) if "exif" in img.info else 1
        except Exception as err:
            raise BadImageError(f"cannot read image {name!r}: {err}") from err
        if fmt == "JPEG" and mode in ("RGB", "L") and data.rstrip(b"\0\r\n ").endswith(_EOI):
            return cls(data, name, size, orientation, info)
        pil = decode_rgb(data, name)
        pil.info.update(info or {})
        return pil

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def decode(self) -> Tensor:
        """Upright pixels at full size (decoded once; multi-crop views share them).

        Shapes:
            returns (3, H, W) uint8.
        """
        if 1 not in self._decoded:
            try:
                raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
                self._decoded[1] = decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            except (RuntimeError, TypeError):  # refused by torchvision's libjpeg-turbo (or no decode_jpeg):
                self._decoded[1] = pil_to_tensor(decode_rgb(self.data, self.name))  # PIL decides, names it
        return self._decoded[1]

    def decode_reduced(self, scale: int) -> tuple["Image.Image | Tensor", int]:
        """Upright pixels decoded at about ``1/scale`` of the full size (DCT scaling), or finer.

        Returns:
            ``(image, actual_scale)``: a PIL image (reduced) or, when the full-size pixels are
            already decoded, those (3, H, W) uint8 with ``actual_scale`` 1.
        """
        if 1 in self._decoded:
            return self._decoded[1], 1
        finer = [s for s in self._decoded if s <= scale]
        if finer:
            return self._decoded[max(finer)], max(finer)
        w, h = self.stored_size
        try:
            with Image.open(io.BytesIO(self.data)) as img:
                _, box = img.draft("RGB", (w // scale, h // scale))
                img.load()
                upright = to_rgb(ImageOps.exif_transpose(img))
        except Exception as err:
            raise BadImageError(f"cannot read image {self.name!r}: {err}") from err
        scale = max(1, round(w / box[2]))
        self._decoded[scale] = upright if scale > 1 else pil_to_tensor(upright)
        return self._decoded[scale], scale

    def to_pil(self) -> Image.Image:
        """The full-size decoded image (for transforms that need PIL, e.g. saliency compositing)."""
        img = decode_rgb(self.data, self.name)
        img.info.update(self.info)
        return img


def as_pil(img: "EncodedImage | Image.Image") -> Image.Image:
    """A PIL image for code that needs one: decodes an :class:`EncodedImage` in full."""
    return img.to_pil() if isinstance(img, EncodedImage) else img


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box, from the same torch RNG calls in the same order.

    So a seeded sample gets exactly the crop the plain path would give it.

    Returns:
        ``(top, left, h, w)`` in pixels.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio)).tolist()  # float32 logs, as torchvision draws them
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    in_ratio = width / height  # no box fitted in 10 draws: the central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def dct_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest DCT scale that still leaves the crop at least ``out`` pixels on each side (1 if none)."""
    return next((s for s in DCT_SCALES if crop_h >= s * out_h and crop_w >= s * out_w), 1)


def crop_resize(img: "EncodedImage | Image.Image", box: tuple[int, int, int, int], size: tuple[int, int]) -> Tensor:
    """Crop ``box`` = (top, left, h, w) of the upright image and resize it to ``size`` = (H, W), bicubic.

    An :class:`EncodedImage` is decoded at the coarsest DCT scale that keeps the crop at least
    ``size`` on each side, and the box edges are moved to the nearest pixel of that scale (at most
    half a reduced pixel: an unbiased jitter far below the crop's own randomness). The crop is a
    view of the decoded pixels, resized by PyTorch's uint8 antialiased bicubic kernel (PIL's filter).

    Shapes:
        returns (3, H, W) uint8.
    """
    top, left, h, w = box
    if isinstance(img, EncodedImage):
        scale = dct_scale(h, w, *size)
        pixels, scale = img.decode_reduced(scale) if scale > 1 else (img.decode(), 1)
        if scale > 1:  # edges to the nearest reduced pixel: at most half a reduced pixel off
            pixels = pil_to_tensor(pixels)
            top, left, bottom, right = (round(v / scale) for v in (top, left, top + h, left + w))
            h, w = max(1, bottom - top), max(1, right - left)
    else:
        pixels = pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
    crop = pixels[:, top : top + h, left : left + w]  # (3, h, w) view
    return TF.resize(crop, list(size), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)


class RandomResizedCropFlip:
    """RandomResizedCrop (bicubic) + horizontal flip + to float (+ normalise) on the fast decode path.

    Draws exactly what ``torchvision.transforms.v2.Compose([RandomResizedCrop, RandomHorizontalFlip,
    ...])`` draws, from the same torch RNG calls; accepts an :class:`EncodedImage` (data sets hand
    one over when ``accepts_encoded`` is set) or any PIL image.

    Args:
        size: output side (or ``(H, W)``).
        scale: area range of the crop.
        ratio: aspect-ratio range of the crop.
        hflip: flip probability.
        mean: per-channel mean to subtract after scaling to [0, 1]; None leaves values in [0, 1].
        std: per-channel std to divide by (with ``mean``).

    Examples:
        >>> t = RandomResizedCropFlip(32, scale=(0.2, 1.0))
        >>> t(Image.new("RGB", (50, 40))).shape
        torch.Size([3, 32, 32])
    """

    accepts_encoded = True

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        std = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).view(3, 1, 1)
        mean = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).view(3, 1, 1)
        self._gain, self._shift = 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std in one addcmul

    def params(self, width: int, height: int) -> tuple[tuple[int, int, int, int], bool]:
        """(crop box (top, left, h, w), flip) drawn like torchvision's crop then flip."""
        box = crop_params(height, width, self.scale, self.ratio)
        flip = bool(torch.rand(1).item() < self.hflip)  # v2 RandomHorizontalFlip: skip when rand >= p
        return box, flip

    def __call__(self, img: "EncodedImage | Image.Image") -> Tensor:
        box, flip = self.params(*img.size)
        pixels = crop_resize(img, box, self.size)  # (3, H, W) uint8
        if flip:
            pixels = pixels.flip(-1)
        return torch.addcmul(self._shift, pixels.float(), self._gain)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip})")

"""JPEG decoding on the GPU (nvJPEG, ``torchvision.io.decode_jpeg(device="cuda")``), behind ``data.gpu_decode``.

Loader workers then only read the file, parse its header and draw the crop and flip (the same
RNG calls as the CPU path, under the sample's seed); a batch travels as compressed bytes plus
boxes and becomes a normalised (B, 3, H, W) tensor when Lightning moves it to the GPU
(:meth:`PendingBatch.to`): one batched decode, then per image crop, bicubic antialiased resize,
flip and normalise on the device. Single-crop views only (MAE, FCMAE, EVA: :class:`RandomResizedCropFlip`).
Images that are not plain RGB/grayscale JPEGs are finished on the CPU and ride along.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data._utils.collate import default_collate_fn_map
from torchvision.io import ImageReadMode, decode_jpeg

from ssl_kit.data.decode import EncodedImage, RandomResizedCropFlip


@dataclass
class Pending:
    """One sample's view: JPEG bytes with its crop, or (not a JPEG) the finished view tensor."""

    data: Tensor | None = None  # (N,) uint8 file bytes
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, h, w in upright pixels
    flip: bool = False
    orientation: int = 1  # EXIF orientation of the stored pixels
    view: Tensor | None = None  # (3, H, W) when finished on the CPU
    transform: RandomResizedCropFlip | None = None  # output size and normalisation (one object per batch)


class GpuDecode:
    """Wrap a :class:`RandomResizedCropFlip` so workers leave decoding to the GPU (see module doc).

    Args:
        transform: the single-crop view (its size, scale, ratio, flip and normalisation are used).
    """

    accepts_encoded = True

    def __init__(self, transform: RandomResizedCropFlip) -> None:
        self.transform = transform

    def __call__(self, img) -> Pending:
        if not isinstance(img, EncodedImage):
            return Pending(view=self.transform(img), transform=self.transform)
        box, flip = self.transform.params(*img.size)
        data = torch.frombuffer(bytearray(img.data), dtype=torch.uint8)
        return Pending(data, box, flip, img.orientation, transform=self.transform)


class PendingBatch:
    """A collated batch of :class:`Pending` views; ``.to(device)`` decodes and returns (B, 3, H, W)."""

    def __init__(self, items: list[Pending], transform: RandomResizedCropFlip) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def to(self, device, **kwargs) -> Tensor:
        """Decode on ``device`` (any device; nvJPEG on CUDA) and finish every view.

        Shapes:
            returns (B, 3, H, W) float32.
        """
        device = torch.device(device)
        t = self.transform
        gain, shift = t._gain.to(device), t._shift.to(device)
        out = torch.empty(len(self.items), 3, *t.size, device=device)
        jpegs = [i for i, p in enumerate(self.items) if p.view is None]
        for i, pixels in zip(jpegs, _decode(self.items, jpegs, device)):
            p = self.items[i]
            top, left, h, w = p.box
            crop = upright(pixels, p.orientation)[:, top : top + h, left : left + w].float()  # (3, h, w)
            view = F.interpolate(crop[None], size=t.size, mode="bicubic", antialias=True, align_corners=False)[0]
            view = view.clamp_(0, 255).round_()  # as the uint8 resize of the CPU path
            out[i] = torch.addcmul(shift, view.flip(-1) if p.flip else view, gain)
        for i, p in enumerate(self.items):
            if p.view is not None:
                out[i] = p.view.to(device)
        return out


def _decode(items: list[Pending], jpegs: list[int], device: torch.device) -> list[Tensor]:
    """Stored-orientation (3, H, W) uint8 pixels of ``items[jpegs]`` on ``device``, one batched call."""
    data = [items[i].data for i in jpegs]
    if not data:
        return []
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one the GPU decoder refuses: decode these on the CPU (an error names nothing
        return [decode_jpeg(d, mode=ImageReadMode.RGB).to(device) for d in data]  # better than libjpeg's)


def upright(pixels: Tensor, orientation: int) -> Tensor:
    """Apply an EXIF orientation to (3, H, W) pixels, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return pixels.flip(-1)
    if orientation == 3:
        return pixels.flip(-1, -2)
    if orientation == 4:
        return pixels.flip(-2)
    if orientation == 5:
        return pixels.transpose(-1, -2)
    if orientation == 6:
        return pixels.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return pixels.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return pixels.transpose(-1, -2).flip(-2)
    return pixels


def _collate_pending(batch: list[Pending], *, collate_fn_map=None) -> PendingBatch:
    return PendingBatch(list(batch), batch[0].transform)


default_collate_fn_map[Pending] = _collate_pending  # the default collate builds a PendingBatch


def gpu_view(transform, trainer) -> "GpuDecode | object":
    """``transform`` wrapped for GPU decoding when training on CUDA, else unchanged (with a warning).

    Raises:
        ValueError: when the transform is not a single crop (multi-crop views decode on the CPU).
    """
    if trainer is None or trainer.strategy.root_device.type != "cuda":
        warnings.warn("data.gpu_decode=true has no effect without a CUDA device: decoding on the CPU.", stacklevel=2)
        return transform
    if not isinstance(transform, RandomResizedCropFlip):
        raise ValueError(f"data.gpu_decode=true supports single-crop views (MAE, FCMAE, EVA); this method's view is "
                         f"{type(transform).__name__}: set data.gpu_decode=false.")
    return GpuDecode(transform)

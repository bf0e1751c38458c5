"""The single-view transforms of masked image modelling, and the deterministic evaluation transform."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import v2 as T

from ssl_kit.data.decode import RandomResizedCropFlip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised_tensor() -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class MaskedImageTransform(RandomResizedCropFlip):
    """MAE/FCMAE/EVA augmentation: RandomResizedCrop(scale, bicubic) + horizontal flip, then normalise.

    On the fast decode path (:mod:`ssl_kit.data.decode`): JPEGs are decoded only as far as the
    crop needs, with the same crops and flips as torchvision's transforms would draw.

    Args:
        img_size: output side.
        scale: RandomResizedCrop area range (MAE: 0.2-1).
        hflip: flip probability.
    """

    def __init__(self, img_size: int, scale: tuple[float, float] = (0.2, 1.0), hflip: float = 0.5) -> None:
        super().__init__(img_size, scale=scale, hflip=hflip, mean=IMAGENET_MEAN, std=IMAGENET_STD)


class Views:
    """The training-view contract: one image in, a list of views out (one transform per view).

    Single-view methods wrap their transform in it so every method's ``training_step`` receives
    ``(views, labels)`` with ``views`` a list of (B, C, H_v, W_v) batches.

    Examples:
        >>> views = Views(MaskedImageTransform(32))(Image.new("RGB", (40, 40)))  # [tensor (3, 32, 32)]
    """

    def __init__(self, *transforms: Callable) -> None:
        self.transforms = transforms

    def __call__(self, img: Image.Image) -> list[Tensor]:
        return [transform(img) for transform in self.transforms]

    def __repr__(self) -> str:
        return f"Views({', '.join(map(repr, self.transforms))})"


class EvalTransform(T.Compose):
    """Resize the short side to ``img_size / crop_ratio``, centre-crop ``img_size``, normalise."""

    def __init__(self, img_size: int, crop_ratio: float = 0.875) -> None:
        super().__init__([
            T.Resize(int(round(img_size / crop_ratio)), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(img_size),
            *_to_normalised_tensor(),
        ])

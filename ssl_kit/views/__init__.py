"""Per-method view transforms. A transform maps one PIL image to a tensor or a list of tensors."""

from ssl_kit.views.basic import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MaskedImageTransform
from ssl_kit.views.multicrop import MultiCropTransform, Photometric, SaliencyMasks

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "MaskedImageTransform", "MultiCropTransform", "Photometric",
           "SaliencyMasks"]

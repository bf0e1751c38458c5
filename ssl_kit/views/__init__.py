"""Per-method view transforms. A transform maps one PIL image to a tensor or a list of tensors."""

from ssl_kit.views.basic import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MaskedImageTransform

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "MaskedImageTransform"]

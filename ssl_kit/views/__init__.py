"""Per-method view transforms. A method's training transform maps one PIL image to a list of
view tensors (:class:`Views` for single-view methods, :class:`MultiCropTransform`)."""

from ssl_kit.views.basic import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MaskedImageTransform, Views
from ssl_kit.views.multicrop import MultiCropTransform, Photometric, SaliencyMasks

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "MaskedImageTransform", "MultiCropTransform", "Photometric",
           "SaliencyMasks", "Views"]

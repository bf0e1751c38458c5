"""Loss functions, pure and method-independent."""

from ssl_kit.losses.cosine import masked_negative_cosine
from ssl_kit.losses.pixel import masked_mse, patchify, pixel_targets, predictions_to_image, unpatchify
from ssl_kit.losses.relic import relic_loss, relicv2_loss, sample_candidates

__all__ = [
    "masked_negative_cosine", "masked_mse", "patchify", "pixel_targets", "predictions_to_image", "unpatchify",
    "relic_loss", "relicv2_loss",
    "sample_candidates",
]

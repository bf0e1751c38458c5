"""Loss functions, pure and method-independent."""

from ssl_kit.losses.pixel import masked_mse, patchify, pixel_targets, unpatchify

__all__ = ["masked_mse", "patchify", "pixel_targets", "unpatchify"]

"""BatchNorm statistics for frozen-feature evaluation of untrained or re-targeted encoders."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

_BN = (nn.modules.batchnorm._BatchNorm,)


def recalibrate_batchnorm(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> int:
    """Recompute every BatchNorm's running mean and variance on ``loader``'s images.

    A randomly initialised encoder carries running statistics of 0 and 1, which no input has;
    its frozen features are then badly scaled and a k-NN or linear baseline built on them is
    unfairly weak. The statistics are re-estimated as a plain average over the whole loader
    (``momentum=None``), with every weight unchanged; the encoder is left in eval mode. An encoder
    without BatchNorm is not run at all.

    Args:
        encoder: the model whose BatchNorm layers are re-estimated in place.
        loader: labelled batches ``(images, labels)`` (typically the training split, eval transform).
        device: where the encoder runs.

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    norms = [m for m in encoder.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    encoder.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    with torch.no_grad():
        for imgs, _ in loader:
            encoder(imgs.to(device, non_blocking=True))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()
    return len(norms)

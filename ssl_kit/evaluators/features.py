"""Feature extraction with a frozen encoder."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader


def runs_bf16(trainer) -> bool | None:
    """True when ``trainer`` trains under ``bf16-mixed`` (on any device), else None: the
    ``bf16`` argument of :func:`extract_features` that encodes at the precision the run trains at.
    A bf16 run on a CPU with native bf16 encodes ~1.6x faster this way (MAE demo ViT)."""
    return True if str(getattr(trainer, "precision", "")).startswith("bf16") else None


def resolve_bf16(bf16: bool | None, device: torch.device | str) -> bool:
    """Whether to autocast to bf16 on ``device``: ``bf16`` as given, and None means on CUDA only."""
    return torch.device(device).type == "cuda" if bf16 is None else bf16


@torch.inference_mode()
def extract_features(
    encode: Callable[[Tensor], Tensor], loader: DataLoader, device: torch.device | str = "cpu",
    bf16: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``encode`` over a labelled loader under bf16 autocast when ``bf16`` is true (None:
    on CUDA only; see :func:`runs_bf16`).

    Shapes:
        returns features (N, D) float32 on CPU and labels (N,) int64.
    """
    device = torch.device(device)
    bf16 = resolve_bf16(bf16, device)
    feats, labels = [], []
    for imgs, y in loader:
        imgs = imgs.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            f = encode(imgs)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()

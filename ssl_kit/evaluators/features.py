"""Feature extraction with a frozen encoder."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader


@torch.inference_mode()
def extract_features(
    encode: Callable[[Tensor], Tensor], loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Run ``encode`` over a labelled loader; bf16 autocast on CUDA.

    Shapes:
        returns features (N, D) float32 on CPU and labels (N,) int64.
    """
    device = torch.device(device)
    feats, labels = [], []
    for imgs, y in loader:
        imgs = imgs.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            f = encode(imgs)
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()

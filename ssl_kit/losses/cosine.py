"""Feature-regression loss of EVA (Fang et al., 2023, arXiv:2211.07636): negative cosine at masked positions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_negative_cosine(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``-cos(pred, target)`` over masked positions only (mask: 1 = masked), in fp32.

    It is -1 when every masked prediction points the way its target does, whatever the
    predictions at kept positions are. Computed in fp32 even under autocast, because the norms in
    the cosine lose too many digits in bf16.

    Shapes:
        pred, target: (B, L, D); mask: (B, L) -> scalar
    """
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # (B, L)
    mask = mask.float()
    return -(cos * mask).sum() / mask.sum().clamp_min(1.0)

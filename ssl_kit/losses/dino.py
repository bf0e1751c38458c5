"""DINO loss: cross-entropy between a centred, sharpened teacher distribution and the student's.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021 (arXiv:2104.14294).

``P_s = softmax(g_s / tau_s)``, ``P_t = softmax((g_t - c) / tau_t)``; the loss averages
``H(P_t(a), P_s(b)) = -sum_k P_t(a)_k log P_s(b)_k`` over every pair of a teacher (global) view
``a`` and a student view ``b`` with ``a != b``, and over the images. The centre ``c`` is an EMA of
the teacher's mean output over the *global* batch. Centring and sharpening together avoid collapse.

The loss is a per-image mean, so under DDP the mean of the per-process losses (what DDP's gradient
averaging optimises) is the loss of the global batch; only the centre needs a collective.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def dino_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], center: Tensor, student_temp: float = 0.1,
              teacher_temp: float = 0.04) -> Tensor:
    """Mean over pairs ``(a, b)``, ``a != b``, of the cross-entropy ``H(P_t(a), P_s(b))``.

    View ``i`` of ``student`` and of ``teacher`` are the same crop: the teacher's views are the
    first ``len(teacher)`` (global) crops, so the pair of a crop with itself is skipped. The
    teacher side gets a stop-gradient. Computed in fp32.

    Args:
        student: student head outputs of every view (global crops first, then local crops).
        teacher: teacher head outputs of the global crops.
        center: the centre ``c`` subtracted from the teacher's outputs.
        student_temp: tau_s.
        teacher_temp: tau_t.

    Shapes:
        student: V_s x (B, K); teacher: V_t x (B, K); center: (1, K) -> scalar.
    """
    if len(teacher) > len(student) or not teacher:
        raise ValueError(f"dino_loss needs 1 <= teacher views <= student views, got {len(teacher)} and {len(student)}.")
    log_p_s = [(s.float() / student_temp).log_softmax(dim=-1) for s in student]  # V_s x (B, K)
    p_t = [((t.detach().float() - center) / teacher_temp).softmax(dim=-1) for t in teacher]  # V_t x (B, K)
    total, pairs = 0.0, 0
    for a, q in enumerate(p_t):
        for b, log_p in enumerate(log_p_s):
            if a == b:
                continue
            total = total + (-q * log_p).sum(dim=-1).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least one pair of different views (one teacher view and one other).")
    return total / pairs


@torch.no_grad()
def update_center(center: Tensor, teacher: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """``c <- m * c + (1 - m) * mean of the teacher outputs over the global batch`` (in place).

    Under ``torch.distributed`` the per-process sums are all-reduced, so every process holds the
    centre of the global batch; returns ``center``.

    Shapes:
        center: (1, K); teacher: V_t x (B, K) -> (1, K)
    """
    outputs = torch.cat([t.detach().float() for t in teacher])  # (V_t * B, K)
    total, count = outputs.sum(dim=0, keepdim=True), outputs.new_tensor(float(outputs.shape[0]))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    center.mul_(momentum).add_(total / count, alpha=1 - momentum)
    return center

"""An exponential-moving-average target network (BYOL, ReLICv2), with its momentum schedule.

Grill et al., "Bootstrap your own latent", 2020 (arXiv:2006.07733): ``target <- m * target +
(1 - m) * online`` after every optimizer step, ``m`` rising from ``base`` to ``final`` on a cosine.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ssl_kit.errors import UserError


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """``final - (final - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, ``final``
    at ``total_steps`` (and after)."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


class EMATarget(nn.Module):
    """A frozen copy of ``online`` updated as its exponential moving average.

    The copy's parameters have ``requires_grad=False`` (so no optimizer group or DDP bucket ever
    holds them); its buffers (BatchNorm statistics) evolve through its own forward passes, as in
    BYOL. The current momentum is a buffer, so it is saved in checkpoints.

    Args:
        online: the module to track (deep-copied once).
        base_momentum: momentum at step 0.
        final_momentum: momentum at the last step.

    Examples:
        >>> online = nn.Linear(4, 2)
        >>> target = EMATarget(online)
        >>> target.update(online, step=10, total_steps=100)
    """

    def __init__(self, online: nn.Module, base_momentum: float = 0.996, final_momentum: float = 1.0) -> None:
        super().__init__()
        for name, m in (("base_momentum", base_momentum), ("final_momentum", final_momentum)):
            if not 0.0 <= m <= 1.0:
                raise UserError(f"{name}={m} is not allowed: EMA momentum must be in [0, 1].")
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.module = copy.deepcopy(online).requires_grad_(False)
        self.register_buffer("momentum", torch.tensor(float(base_momentum)))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module, step: int, total_steps: int) -> float:
        """Move toward ``online`` with the momentum of ``step`` (optimizer steps done); returns it."""
        m = cosine_momentum(step, total_steps, self.base_momentum, self.final_momentum)
        target_params = list(self.module.parameters())
        online_params = [p.detach() for p in online.parameters()]
        if len(target_params) != len(online_params):
            raise RuntimeError("EMATarget.update: online and target have different parameter lists.")
        # t + (1 - m)(o - t), one fused kernel per dtype/device (as timm's ModelEmaV3 does)
        torch._foreach_lerp_(target_params, online_params, 1.0 - m)
        self.momentum.fill_(m)
        return m

"""LARS: layer-wise adaptive rate scaling (You et al., 2017, arXiv:1708.03888), SGD-momentum based,
as used by SimCLR/BYOL/ReLICv2 for large-batch pretraining and by MAE's linear probe."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.optim import Optimizer

from ssl_kit.errors import UserError


class LARS(Optimizer):
    """SGD with momentum whose per-tensor step is scaled by the trust ratio
    ``trust_coefficient * ||w|| / ||g + wd * w||`` (1 when either norm is 0).

    Weight decay is added to the gradient before the trust ratio. With ``exclude_bias_and_norm``
    every tensor with ``ndim <= 1`` (biases, norm scales) gets neither weight decay nor
    adaptation, as in BYOL. A param group's own ``weight_decay`` overrides the default.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 coefficient.
        trust_coefficient: eta in the trust ratio.
        exclude_bias_and_norm: skip decay and adaptation for 0-/1-D tensors.

    Examples:
        >>> opt = LARS(torch.nn.Linear(4, 2).parameters(), lr=0.1, weight_decay=1e-6)
    """

    def __init__(
        self, params: Iterable, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
        trust_coefficient: float = 0.001, exclude_bias_and_norm: bool = True,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise UserError(f"LARS: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0 "
                             f"and trust_coefficient={trust_coefficient} > 0.")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, exclude_bias_and_norm=exclude_bias_and_norm)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                plain = group["exclude_bias_and_norm"] and p.ndim <= 1
                if not plain:
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = torch.where((w_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * w_norm / g_norm, torch.ones_like(w_norm))
                    grad = grad * trust
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss

"""LARS: layer-wise adaptive rate scaling (You et al., 2017, arXiv:1708.03888)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum whose update of each weight matrix is rescaled by its trust ratio
    ``trust_coefficient * ||w|| / ||g + weight_decay * w||`` (1 when either norm is 0).

    Tensors with ``ndim <= 1`` (biases, norm parameters) take a plain momentum-SGD step with
    neither trust ratio nor weight decay, as in the MAE linear-probe recipe (lr 0.1 x B/256,
    no weight decay, batch 16384).

    Update, per weight matrix ``w`` with gradient ``g``:
    ``u = g + wd * w;  u *= trust_ratio;  m = momentum * m + u;  w -= lr * m``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum.
        weight_decay: L2 coefficient added to the gradient of matrices before the trust ratio.
        trust_coefficient: eta in the paper; scales the ratio of weight norm to update norm.

    Examples:
        >>> head = torch.nn.Linear(768, 1000)
        >>> opt = LARS(head.parameters(), lr=0.1 * 16384 / 256, weight_decay=0.0)
    """

    def __init__(
        self, params: Iterable, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient)):
            if value < 0:
                raise ValueError(f"LARS {name}={value} is not allowed: it must be >= 0.")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    update = update.mul(self._trust_ratio(p, update, group["trust_coefficient"]))
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss

    @staticmethod
    def _trust_ratio(p: torch.Tensor, update: torch.Tensor, coefficient: float) -> torch.Tensor:
        w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
        ratio = coefficient * w_norm / u_norm
        # A zero weight (fresh zero-init) or zero update has no scale to adapt to: step as SGD.
        return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))

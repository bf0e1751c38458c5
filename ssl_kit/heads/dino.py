"""DINO's projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", 2021, arXiv:2104.14294)."""

from __future__ import annotations

import torch  # noqa: F401  (the docstring example)
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """MLP (``num_layers`` linear layers, GELU) to a ``bottleneck_dim`` code, L2-normalised, then a
    weight-normalised linear layer without bias to ``out_dim`` prototypes.

    The last layer's weight norm is fixed to 1 (the paper's ``norm_last_layer``): each prototype
    row is normalised in the forward pass, which is ``weight_norm`` with its gain frozen at 1 in
    one line and one parameter (``last_layer.weight``, the direction ``v``). The method freezes
    that parameter during the first epoch(s); see :class:`~ssl_kit.methods.dino.DINO`.

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K (paper: 65,536).
        hidden_dim: MLP hidden width (paper: 2048).
        bottleneck_dim: width before normalisation (paper: 256).
        num_layers: linear layers of the MLP (paper: 3).
        batch_norm: BatchNorm after each hidden linear layer (off for ViTs in the paper).

    Examples:
        >>> head = DINOHead(384, out_dim=1024, hidden_dim=256, bottleneck_dim=64)
        >>> head(torch.randn(4, 384)).shape
        torch.Size([4, 1024])
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers}: DINOHead needs at least one linear layer.")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():  # the reference's init: truncated normal 0.02, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # default init, as the reference's v

    def forward(self, x: Tensor) -> Tensor:
        """Prototype scores (logits before the temperature).

        Shapes:
            x: (B, in_dim) -> (B, out_dim)
        """
        z = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim), unit norm
        return F.linear(z, F.normalize(self.last_layer.weight, dim=1))  # each prototype has norm 1

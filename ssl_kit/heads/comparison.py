"""The comparison (projection) MLP that maps encoder features to the space the loss compares in."""

from __future__ import annotations

from torch import Tensor, nn

from ssl_kit.errors import UserError


class ComparisonMLP(nn.Module):
    """Linear -> BatchNorm -> ReLU blocks, then a linear output (BYOL's projector; ReLICv2's
    comparison network h). Tomasev et al., 2022 (arXiv:2201.05119).

    Args:
        in_dim: encoder feature width.
        hidden_dim: width of the hidden layers.
        out_dim: embedding width the loss compares.
        num_layers: linear layers in total (>= 1).
        batch_norm: BatchNorm1d after each hidden linear layer (off for BN-free setups).

    Examples:
        >>> head = ComparisonMLP(512, hidden_dim=1024, out_dim=128)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise UserError(f"num_layers={num_layers} is not allowed: use num_layers >= 1.")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            layers += [nn.ReLU(inplace=True)]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes:
            x: (B, in_dim) -> (B, out_dim)
        """
        return self.mlp(x)

"""Optimizers not in torch.optim."""

from ssl_kit.optim.lars import LARS

__all__ = ["LARS"]

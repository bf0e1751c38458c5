"""Optimizers that torch and timm do not ship in the form the evaluation recipes need."""

from ssl_kit.optim.lars import LARS

__all__ = ["LARS"]

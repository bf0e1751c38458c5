"""Optimizers not in torch.optim: LARS for large-batch pretraining and the linear probe."""

from ssl_kit.optim.lars import LARS

__all__ = ["LARS"]

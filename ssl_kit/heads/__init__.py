"""Heads and decoders used only during pretraining."""

from ssl_kit.heads.comparison import ComparisonMLP
from ssl_kit.heads.fcmae_decoder import FCMAEDecoder
from ssl_kit.heads.mae_decoder import MAEDecoder

__all__ = ["MAEDecoder", "FCMAEDecoder", "ComparisonMLP"]

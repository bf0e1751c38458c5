"""Pretraining methods. Each is one LightningModule; importing it here is its registration."""

from ssl_kit.methods.base import SSLMethod
from ssl_kit.methods.dino import DINO
from ssl_kit.methods.eva import EVA
from ssl_kit.methods.fcmae import FCMAE
from ssl_kit.methods.mae import MAE
from ssl_kit.methods.relicv2 import ReLICv2

__all__ = ["SSLMethod", "MAE", "FCMAE", "ReLICv2", "EVA", "DINO"]

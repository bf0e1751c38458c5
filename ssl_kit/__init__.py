"""ssl_kit: self-supervised pretraining for vision encoders (MAE, FCMAE, ReLICv2, EVA)."""

__version__ = "0.1.0"

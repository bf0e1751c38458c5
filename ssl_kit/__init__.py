"""ssl_kit: self-supervised pretraining for vision encoders (MAE, FCMAE, ReLICv2, EVA)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import ssl_kit` stays light (no timm/faiss) for the CLI's help and config parsing.
    if name == "load_encoder":
        from ssl_kit.checkpoints.load import load_encoder

        return load_encoder
    raise AttributeError(f"module 'ssl_kit' has no attribute {name!r}")

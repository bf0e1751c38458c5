"""Data sources and the shared data module."""

from ssl_kit.data.datamodule import SSLDataModule
from ssl_kit.data.datasets import Digits, ImageFolder, SyntheticImages, open_rgb, scan_images

__all__ = ["SSLDataModule", "Digits", "ImageFolder", "SyntheticImages", "open_rgb", "scan_images"]

"""Data sources and the shared data module."""

from ssl_kit.data.datamodule import SSLDataModule
from ssl_kit.data.datasets import Digits, ImageFolder, SyntheticImages, open_rgb, scan_images
from ssl_kit.data.sampler import ResumableSampler
from ssl_kit.data.shards import ShardSamples

__all__ = ["SSLDataModule", "Digits", "ImageFolder", "SyntheticImages", "open_rgb", "scan_images", "ResumableSampler",
           "ShardSamples"]

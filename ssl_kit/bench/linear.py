"""Linear probe wall time: cached features vs encoding every step, same epochs.

    python -m ssl_kit.bench.linear --encoder vit_small_patch16_224 --img_size 224 --images 2048

Prints one row per mode: total ``fit`` wall time (feature extraction included for the cached
mode), and the speed-up. Synthetic images, random-init encoder; nothing is downloaded.
"""

from __future__ import annotations

import tempfile

import pytorch_lightning as pl
import torch
from jsonargparse import CLI

from ssl_kit.bench.timer import Span
from ssl_kit.data import SSLDataModule
from ssl_kit.evaluators.linear import LinearProbe


def time_probe(cache: bool, encoder: str, img_size: int, images: int, epochs: int, batch_size: int,
               seeds: int, workers: int) -> float:
    """Seconds for one ``fit`` of :class:`LinearProbe` (no augmentation, so both modes do the same work)."""
    pl.seed_everything(0, verbose=False)
    probe = LinearProbe(encoder, img_size=img_size, cache_features=cache, seeds=tuple(range(seeds)),
                        augment=False, warmup_epochs=1)
    dm = SSLDataModule("synthetic", synthetic_size=images, image_size=img_size, batch_size=batch_size,
                       num_workers=workers, val_fraction=0.2)
    precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = pl.Trainer(max_epochs=epochs, precision=precision, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
                             devices=1)
        with Span("cuda" if torch.cuda.is_available() else None) as span:
            trainer.fit(probe, datamodule=dm)
        return span.seconds.wall


def main(encoder: str = "vit_tiny_patch16_224", img_size: int = 64, images: int = 512, epochs: int = 10,
         batch_size: int = 64, seeds: int = 3, workers: int = 2) -> dict[str, float]:
    """Time the linear probe with and without cached features.

    Args:
        encoder: timm name (random init) or any source ``load_encoder`` accepts.
        img_size: image side.
        images: synthetic dataset size (80% train, 20% val).
        epochs: probe epochs, the same for both modes.
        batch_size: per-step batch.
        seeds: heads trained side by side.
        workers: data-loader processes.
    """
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    args = (encoder, img_size, images, epochs, batch_size, seeds, workers)
    times = {"uncached": time_probe(False, *args), "cached": time_probe(True, *args)}
    print(f"\nlinear probe, {encoder} @ {img_size} px, {images} images, {epochs} epochs, batch {batch_size}, "
          f"{seeds} heads, {device}")
    print(f"  {'mode':<10}{'fit wall time (s)':>20}")
    for mode, seconds in times.items():
        print(f"  {mode:<10}{seconds:>20.2f}")
    print(f"  cached is {times['uncached'] / times['cached']:.1f}x faster for the same epochs")
    return times


if __name__ == "__main__":
    CLI(main)

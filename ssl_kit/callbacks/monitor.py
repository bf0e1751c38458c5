"""Live monitoring: images per second and MAE-style reconstruction grids in TensorBoard."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid

from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD


class Throughput(pl.Callback):
    """Logs ``train/img_per_s`` (global: per-device images x world size) for every optimizer step."""

    def __init__(self) -> None:
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        imgs = batch[0][0] if isinstance(batch[0], (list, tuple)) else batch[0]
        elapsed = time.perf_counter() - self._start
        rate = imgs.shape[0] * trainer.world_size / max(elapsed, 1e-9)
        pl_module.log("train/img_per_s", rate, prog_bar=True, batch_size=imgs.shape[0])


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


class ReconstructionGrid(pl.Callback):
    """Every ``every_n_epochs`` logs rows of (masked input | reconstruction with the visible
    patches pasted back | original) for a fixed set of validation images. Works with any model
    exposing ``reconstruct(imgs) -> (recon, mask)`` and ``patch_size``.

    The masks are drawn from this callback's own generator, seeded by ``seed`` and the epoch, and
    the process's RNG states are restored afterwards: drawing them on rank 0 only must not shift
    rank 0's random stream, or a resumed DDP run would no longer match an uninterrupted one.

    Args:
        every_n_epochs: logging period.
        num_images: images in the grid.
        seed: seed of the grid's masks (the same images get the same masks at a given epoch).
    """

    def __init__(self, every_n_epochs: int = 5, num_images: int = 8, seed: int = 0) -> None:
        self.every_n_epochs, self.num_images, self.seed = every_n_epochs, num_images, seed
        self._imgs: torch.Tensor | None = None

    def reconstruct(self, pl_module, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pl_module.reconstruct(imgs)`` in eval mode under a private seeded RNG; global RNG untouched.

        Shapes:
            imgs: (B, C, H, W) -> recon (B, C, H, W), mask (B, L)
        """
        cuda = imgs.device.type == "cuda"
        was_training = pl_module.training
        with torch.random.fork_rng(devices=[imgs.device] if cuda else []):
            seed = self.seed + pl_module.current_epoch
            torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it seeds every GPU
            if cuda:
                with torch.cuda.device(imgs.device):
                    torch.cuda.manual_seed(seed)  # the images' device only
            pl_module.eval()
            try:
                return pl_module.reconstruct(imgs)
            finally:
                pl_module.train(was_training)

    def _fixed_images(self, trainer) -> torch.Tensor:
        if self._imgs is None:
            dm = trainer.datamodule
            dataset = dm.split("val", dm.eval_transform)
            n = min(self.num_images, len(dataset))
            self._imgs = torch.stack([dataset[i][0] for i in range(n)])
        return self._imgs

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not hasattr(pl_module, "reconstruct") or trainer.logger is None or not trainer.is_global_zero:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        imgs = self._fixed_images(trainer).to(pl_module.device)
        recon, mask = self.reconstruct(pl_module, imgs)  # (B, C, H, W), (B, L)
        p = pl_module.patch_size
        h, w = imgs.shape[-2] // p, imgs.shape[-1] // p
        pixel_mask = mask.reshape(-1, 1, h, w).repeat_interleave(p, 2).repeat_interleave(p, 3)  # (B, 1, H, W)
        masked = imgs * (1 - pixel_mask)
        pasted = imgs * (1 - pixel_mask) + recon * pixel_mask
        rows = torch.stack([_denormalise(masked), _denormalise(pasted), _denormalise(imgs)], dim=1)  # (B, 3, C, H, W)
        grid = make_grid(rows.flatten(0, 1), nrow=3, padding=1)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("reconstructions", grid, global_step=trainer.global_step)

"""ReLICv2 step time and multi-crop augmentation throughput.

    python -m ssl_kit.bench.relicv2                       # demo size: ResNet-18, 2x32 + 2x16 px
    python -m ssl_kit.bench.relicv2 --model resnet50 --img_size 224 --small_size 96 \\
        --n_large 4 --n_small 2 --batch_size 64              # the paper's views (on a GPU)

The step is ReLICv2's own ``training_step`` on its multi-crop example batch, backward, the LARS
update of its ``configure_optimizers`` and the EMA target update of its ``optimizer_step``, run by
a Lightning ``Trainer`` (:mod:`ssl_kit.bench.steps`, the path of ``python -m ssl_kit bench``);
bf16-mixed on CUDA. Then the per-image multi-crop CPU transform (one thread, as in a loader worker)
and the batched kornia photometric pipelines (on the step's device). Prints median wall and
process-CPU seconds: on a shared CPU the wall figures are inflated by contention, the CPU-time
ones much less.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from jsonargparse import CLI
from PIL import Image

from ssl_kit.bench.steps import pick_device, step_precision, timed_steps
from ssl_kit.bench.timer import Seconds, interleaved, median
from ssl_kit.data import SyntheticImages
from ssl_kit.methods import ReLICv2
from ssl_kit.views.multicrop import MultiCropTransform, view_photometric


def augmentation_throughput(images: list[Image.Image], transform: MultiCropTransform) -> tuple[float, float]:
    """Images per second (each giving all its views) through the per-image CPU transform: (wall, CPU).
    Timed with one torch thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = median(interleaved({"transform": lambda: [transform(img) for img in images]}, rounds=2)["transform"])
    finally:
        torch.set_num_threads(threads)
    return len(images) / t.wall, len(images) / t.cpu


def kornia_throughput(batch: int, sizes: list[int], device: torch.device) -> float:
    """Images per second through the batched kornia photometric pipelines of every view (wall)."""
    pipelines = [view_photometric(v).kornia(s) for v, s in enumerate(sizes)]
    views = [torch.rand(batch, 3, s, s, device=device) for s in sizes]
    times = interleaved({"kornia": lambda: [p(v) for p, v in zip(pipelines, views)]}, rounds=3, device=device)
    return batch / median(times["kornia"]).wall


def step_time(model: ReLICv2, batch_size: int, steps: int, warmup_steps: int, device: torch.device,
              precision: str) -> Seconds:
    """Median seconds per training step (forward, backward, LARS step, EMA update): wall and CPU."""
    return median(timed_steps(model, batch_size, steps, warmup_steps, device, precision).steps)


def main(
    model: str = "resnet18", img_size: int = 32, small_size: int = 16, n_large: int = 2, n_small: int = 2,
    batch_size: int = 32, steps: int = 3, warmup_steps: int = 1, aug_images: int = 64, source_size: int = 64,
    threads: int = 2, device: str = "auto", precision: str | None = None, seed: int = 0,
) -> None:
    """Print ReLICv2 step time and multi-crop augmentation throughput.

    Args:
        model: timm encoder name.
        img_size: side of the large views.
        small_size: side of the small views.
        n_large: large views per image.
        n_small: small views per image.
        batch_size: images per step (and per kornia batch).
        steps: timed steps (median reported).
        warmup_steps: untimed steps first.
        aug_images: synthetic images through the per-image multi-crop transform.
        source_size: side of those images.
        threads: torch CPU threads for the step.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: Lightning precision of the step (default: fp32 on a CPU, bf16-mixed on a GPU that has it).
        seed: RNG seed.
    """
    torch.set_num_threads(threads)
    pl.seed_everything(seed, verbose=False)
    dev = pick_device(device)
    precision = step_precision(dev, precision)
    net = ReLICv2(model, img_size=img_size, small_size=small_size, n_large=n_large, n_small=n_small,
                  hidden_dim=4096 if img_size >= 224 else 512, out_dim=256 if img_size >= 224 else 128)
    print(f"device {dev}, torch threads {threads}, {precision}, {model}, "
          f"{n_large}x{img_size} + {n_small}x{small_size} px")
    t = step_time(net, batch_size, steps, warmup_steps, dev, precision)
    print(f"train step, batch {batch_size}, median of {steps}: {t.wall * 1e3:.0f} ms wall "
          f"({batch_size / t.wall:.1f} img/s), {t.cpu * 1e3:.0f} ms process CPU")
    data = SyntheticImages(aug_images, size=source_size)
    images = [data.load(i) for i in range(len(data))]
    transform = MultiCropTransform(n_large, n_small, img_size, small_size)
    wall_rate, cpu_rate = augmentation_throughput(images, transform)
    n_views = n_large + n_small
    print(f"multi-crop CPU transform (one worker, {source_size} px source): {wall_rate:.0f} img/s wall "
          f"({wall_rate * n_views:.0f} views/s), {cpu_rate:.0f} img/s per CPU-second")
    sizes = [img_size] * n_large + [small_size] * n_small
    print(f"kornia batched photometric ({dev}, batch {batch_size}): "
          f"{kornia_throughput(batch_size, sizes, dev):.0f} img/s wall")


if __name__ == "__main__":
    CLI(main, as_positional=False)

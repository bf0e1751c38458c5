"""ReLICv2 step time and multi-crop augmentation throughput.

    python -m ssl_kit.bench.relicv2                       # demo size: ResNet-18, 2x32 + 2x16 px
    python -m ssl_kit.bench.relicv2 --model resnet50 --img_size 224 --small_size 96 \\
        --n_large 4 --n_small 2 --batch_size 64              # the paper's views (on a GPU)

Prints wall and CPU-process seconds: on a shared CPU the wall figures are inflated by contention,
the CPU-time ones much less. On CUDA the step runs in bf16 autocast and the photometric
augmentation is also timed batched with kornia.
"""

from __future__ import annotations

import time

import torch
from jsonargparse import CLI
from PIL import Image

from ssl_kit.data import SyntheticImages
from ssl_kit.methods import ReLICv2
from ssl_kit.views.multicrop import MultiCropTransform, view_photometric


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, process-CPU) seconds per call, after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def augmentation_throughput(images: list[Image.Image], transform: MultiCropTransform) -> tuple[float, float]:
    """Images per second (each giving all its views) through the per-image CPU transform: (wall, CPU).
    Timed with one torch thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wall, cpu = _timed(lambda: [transform(img) for img in images], repeats=2)
    finally:
        torch.set_num_threads(threads)
    return len(images) / wall, len(images) / cpu


def kornia_throughput(batch: int, sizes: list[int], device: torch.device) -> float:
    """Images per second through the batched kornia photometric pipelines of every view (wall)."""
    pipelines = [view_photometric(v).kornia(s) for v, s in enumerate(sizes)]
    views = [torch.rand(batch, 3, s, s, device=device) for s in sizes]
    wall, _ = _timed(lambda: [p(v) for p, v in zip(pipelines, views)], repeats=3)
    return batch / wall


def step_time(model: ReLICv2, batch: int, device: torch.device, steps: int) -> tuple[float, float]:
    """Seconds per training step (forward, backward, LARS step, EMA update): (wall, CPU)."""
    hp = model.hparams
    model.to(device).train()
    views = [torch.randn(batch, 3, hp.img_size, hp.img_size, device=device) for _ in range(hp.n_large)]
    views += [torch.randn(batch, 3, hp.small_size, hp.small_size, device=device) for _ in range(hp.n_small)]
    optimizer = model.optimizer_fn(model.param_groups())
    online = torch.nn.Sequential(model.encoder, model.head)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _, _ = model(views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.target.update(online, step=1, total_steps=100)

    return _timed(step, steps)


def main(
    model: str = "resnet18", img_size: int = 32, small_size: int = 16, n_large: int = 2, n_small: int = 2,
    batch_size: int = 32, steps: int = 3, aug_images: int = 64, source_size: int = 64, threads: int = 2,
) -> None:
    """Print ReLICv2 step time and multi-crop augmentation throughput."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = ReLICv2(model, img_size=img_size, small_size=small_size, n_large=n_large, n_small=n_small,
                  hidden_dim=4096 if img_size >= 224 else 512, out_dim=256 if img_size >= 224 else 128)
    print(f"device {device}, torch threads {threads}, {model}, {n_large}x{img_size} + {n_small}x{small_size} px")
    wall, cpu = step_time(net, batch_size, device, steps)
    print(f"train step, batch {batch_size}: {wall * 1e3:.0f} ms wall ({batch_size / wall:.1f} img/s), "
          f"{cpu * 1e3:.0f} ms process CPU")
    data = SyntheticImages(aug_images, size=source_size)
    images = [data.load(i) for i in range(len(data))]
    transform = MultiCropTransform(n_large, n_small, img_size, small_size)
    wall_rate, cpu_rate = augmentation_throughput(images, transform)
    n_views = n_large + n_small
    print(f"multi-crop CPU transform (one worker, {source_size} px source): {wall_rate:.0f} img/s wall "
          f"({wall_rate * n_views:.0f} views/s), {cpu_rate:.0f} img/s per CPU-second")
    sizes = [img_size] * n_large + [small_size] * n_small
    print(f"kornia batched photometric ({device}, batch {batch_size}): "
          f"{kornia_throughput(batch_size, sizes, device):.0f} img/s wall")


if __name__ == "__main__":
    CLI(main, as_positional=False)

"""Training-data throughput per CPU core: decode + RandomResizedCrop(224) + flip on ImageNet-sized JPEGs.

    python -m ssl_kit.bench.data                    # 300 JPEGs, 5 interleaved rounds
    python -m ssl_kit.bench.data --images 1000 --rounds 7

Compares, on the same JPEGs (about 500 x 375, quality 90, made at run time from scikit-learn's two
bundled photographs by random crops and resizes), each in one process with one torch thread (what
one loader worker does), over full loader passes (batch 64, shuffled, collated):

* ``torchvision``: ``torchvision.datasets.ImageFolder`` + ``RandomResizedCrop(224)`` (its defaults:
  scale 0.08-1, bilinear) + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``: the usual baseline;
* ``torchvision-mae``: the same with MAE's crop (scale 0.2-1, bicubic), i.e. ssl_kit's output;
* ``ssl_kit-folder``: ``SSLDataModule(dataset="folder")`` with MAE's view (the fast decode path);
* ``ssl_kit-shards``: ``SSLDataModule(dataset="shards")`` over the same images written as shards;
* ``ssl_kit-shards-gpu_decode (CPU side)``: the same with ``data.gpu_decode``: what is left on the
  CPU when nvJPEG decodes on the GPU (read, header, crop draw, collate; the GPU side is not timed).

Paths run in interleaved rounds; the figure per path is its median images per CPU-second (process
time, so a busy machine inflates it less than wall time), and the ratios are medians of the
per-round ratios. It also prints the decode rate a node of 8 GPUs needs (see ``--gflops_per_image``).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from jsonargparse import CLI
from PIL import Image

from ssl_kit.bench.timer import Span

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, n: int, seed: int = 0, quality: int = 90, long_side: int = 500) -> list[Path]:
    """``n`` ImageNet-sized JPEGs in two class folders: random crops of scikit-learn's two photographs,
    resized to about ``long_side`` x 3/4 of it (either orientation, +-10%), re-encoded at ``quality``."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        src = photos[i % 2]
        w, h = int(src.width * rng.uniform(0.5, 1)), int(src.height * rng.uniform(0.5, 1))
        x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
        long, short = int(long_side * rng.uniform(0.9, 1.1)), int(long_side * 0.75 * rng.uniform(0.9, 1.1))
        size = (long, short) if rng.random() < 0.75 else (short, long)
        path = root / f"class{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC).save(path, "JPEG", quality=quality)
        files.append(path)
    return files


def torchvision_loader(root: Path, batch_size: int, size: int, mae_recipe: bool):
    """torchvision's ImageFolder with RandomResizedCrop (its defaults, or MAE's scale and bicubic) + flip."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    crop = T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC) if mae_recipe \
        else T.RandomResizedCrop(size)
    transform = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.utils.data.DataLoader(ImageFolder(str(root), transform=transform), batch_size=batch_size,
                                       shuffle=True, drop_last=True, num_workers=0)


def ssl_kit_loader(root: str, batch_size: int, size: int, dataset: str, gpu_decode: bool = False):
    """ssl_kit's training loader with MAE's view (scale 0.2-1, bicubic). ``gpu_decode``: the worker
    side of ``data.gpu_decode`` (header, crop draw, collate; the decode itself would run on the GPU)."""
    from ssl_kit.data import SSLDataModule
    from ssl_kit.data.gpu_decode import GpuDecode
    from ssl_kit.views import EvalTransform, MaskedImageTransform

    dm = SSLDataModule(dataset=dataset, root=root, val_fraction=0.0, batch_size=batch_size, num_workers=0,
                       bad_images="error")
    view = MaskedImageTransform(size)
    dm.set_transforms(GpuDecode(view) if gpu_decode else view, EvalTransform(size))
    return dm.train_dataloader()


def timed_pass(loader) -> tuple[int, float, float]:
    """(images, CPU seconds, wall seconds) of one full pass over ``loader``."""
    n = 0
    with Span() as span:
        for views, _ in loader:
            n += len(views)
    return n, span.seconds.cpu, span.seconds.wall


def node_requirement(gflops_per_image: float, mfu: float, peak_tflops: float, gpus: int, cores: int) -> str:
    per_gpu = mfu * peak_tflops * 1e12 / (gflops_per_image * 1e9)
    return (f"{gpus} GPUs at {mfu:.0%} MFU of {peak_tflops:.0f} TFLOP/s with {gflops_per_image:.1f} GFLOP per "
            f"image: {per_gpu:,.0f} img/s per GPU, {gpus * per_gpu:,.0f} img/s per node = "
            f"{gpus * per_gpu / cores:,.0f} img/s per core on {cores} cores")


def main(images: int = 300, rounds: int = 5, batch_size: int = 64, size: int = 224, long_side: int = 500,
         workdir: str | None = None, gflops_per_image: float = 56.3, mfu: float = 0.4, peak_tflops: float = 989.0,
         gpus: int = 8, cores: int = 112) -> dict:
    """Measure images per CPU-second of each data path (see the module docstring).

    Args:
        images: JPEGs to make (split into shards of 100).
        size: output side of the crops.
        long_side: long side of the JPEGs (the short side is 3/4 of it).
        rounds: interleaved rounds (each path once per round).
        batch_size: loader batch size.
        workdir: where to write the JPEGs and shards (default: a temporary folder).
        gflops_per_image: model FLOPs per training image (forward + backward); 56.3 is MAE
            ViT-B/16 at 224 px as ``python -m ssl_kit bench --config configs/mae.yaml`` counts it.
        mfu: model FLOPs utilisation assumed for the GPUs.
        peak_tflops: dense bf16 peak per GPU (H100 SXM: 989).
        gpus: GPUs per node.
        cores: CPU cores per node for data loading (a DGX H100 has 2 x 56).
    """
    from ssl_kit.data.shard_writer import FolderSource, shard

    torch.set_num_threads(1)  # one loader worker's worth of CPU
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(workdir or tmp.name)
    folder = work / "jpegs"
    make_jpegs(folder, images, long_side=long_side)
    pattern = shard(data=FolderSource(str(folder)), output=str(work / "shards"), shard_size=100)["pattern"]
    paths = {
        "torchvision": lambda: torchvision_loader(folder, batch_size, size, mae_recipe=False),
        "torchvision-mae": lambda: torchvision_loader(folder, batch_size, size, mae_recipe=True),
        "ssl_kit-folder": lambda: ssl_kit_loader(str(folder), batch_size, size, "folder"),
        "ssl_kit-shards": lambda: ssl_kit_loader(pattern, batch_size, size, "shards"),
        "ssl_kit-shards-gpu_decode (CPU side)": lambda: ssl_kit_loader(pattern, batch_size, size, "shards", True),
    }
    rate: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, make in paths.items():
            n, cpu, seconds = timed_pass(make())
            rate[name].append(n / cpu)
            wall[name].append(n / seconds)
    shape = f"{images} JPEGs ~{long_side}x{long_side * 3 // 4} q90 -> {size} px"
    return report(rate, wall, shape, rounds, node_requirement(gflops_per_image, mfu, peak_tflops, gpus, cores))


def report(rate: dict, wall: dict, shape: str, rounds: int, requirement: str) -> dict:
    median = {name: statistics.median(r) for name, r in rate.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(rate[a], rate[b]))  # noqa: E731
    ratios = {
        "folder_vs_torchvision": ratio("ssl_kit-folder", "torchvision"),
        "folder_vs_torchvision_mae": ratio("ssl_kit-folder", "torchvision-mae"),
        "shards_vs_folder": ratio("ssl_kit-shards", "ssl_kit-folder"),
    }
    print(f"data path throughput, {shape}, 1 process x 1 thread, median of {rounds} interleaved rounds")
    print(f"  {'path':<38}{'img/s per CPU-second':>22}{'img/s wall':>12}")
    for name in rate:
        print(f"  {name:<38}{median[name]:>22.1f}{statistics.median(wall[name]):>12.1f}")
    print(f"  ssl_kit folder / torchvision (defaults):     {ratios['folder_vs_torchvision']:.2f}x")
    print(f"  ssl_kit folder / torchvision (MAE's recipe): {ratios['folder_vs_torchvision_mae']:.2f}x")
    print(f"  shard reading cost vs folder:                {100 * (1 / ratios['shards_vs_folder'] - 1):+.1f}%")
    print(f"  needed: {requirement}")
    return {"img_per_cpu_s": median, "ratios": ratios, "requirement": requirement}


if __name__ == "__main__":
    CLI(main, as_positional=False)

"""The fast decode path for random-resized crops: the same crops and flips as torchvision, statistically
equivalent pixels (with and without DCT-scaled decoding), EXIF rotation, the fall-back to PIL, and the
GPU decoder's batch path (run on the CPU here, on CUDA where there is one)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2 as T

from ssl_kit.data import open_rgb
from ssl_kit.data.decode import EncodedImage, RandomResizedCropFlip, crop_params, dct_scale
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo_jpegs(n: int = 12, seed: int = 0) -> list[bytes]:
    """ImageNet-like JPEGs (about 500 x 375, quality 90): random crops of scikit-learn's two photographs."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = photos[i % 2]
        w, h = int(src.width * rng.uniform(0.6, 1)), int(src.height * rng.uniform(0.6, 1))
        x, y = rng.integers(0, src.width - w + 1), rng.integers(0, src.height - h + 1)
        size = (500, 375) if i % 3 else (375, 500)
        buf = io.BytesIO()
        src.crop((x, y, x + w, y + h)).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def plain(size: int, scale=(0.2, 1.0)) -> T.Compose:
    """The plain path: torchvision's transforms on a fully decoded PIL image (MAE's recipe)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(), T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def fast(size: int, scale=(0.2, 1.0)) -> RandomResizedCropFlip:
    return RandomResizedCropFlip(size, scale=scale, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return photo_jpegs()


def test_crop_boxes_are_torchvision_draws():
    """Same seed, same box, for every shape (including the central-crop fallback of extreme shapes)."""
    rrc = T.RandomResizedCrop(32, scale=(0.08, 1.0))
    for seed in range(300):
        height, width = [(375, 500), (500, 375), (7, 400), (300, 9), (64, 64)][seed % 5]
        torch.manual_seed(seed)
        expected = rrc.make_params([torch.empty(3, height, width)])
        torch.manual_seed(seed)
        got = crop_params(height, width, (0.08, 1.0), (3 / 4, 4 / 3))
        assert got == (expected["top"], expected["left"], expected["height"], expected["width"]), seed


@pytest.mark.parametrize("size, max_scale", [(224, 1), (64, 4)], ids=["224px-full-decode", "64px-dct-scaled"])
def test_views_match_the_plain_path(jpegs, size, max_scale):
    """Per sample (same seed): same crop and flip, pixels within rounding at 224 px (libjpeg full
    decode) and within a few levels at 64 px, where crops decode at 1/2 or 1/4 size (the box edges
    snap to that grid). Over all samples: per-channel mean and std agree."""
    plain_t, fast_t = plain(size), fast(size)
    plain_views, fast_views, scales = [], [], []
    for k in range(48):
        data = jpegs[k % len(jpegs)]
        encoded = EncodedImage.open(data, f"img{k}")
        torch.manual_seed(k)
        box, _ = fast_t.params(*encoded.size)
        scales.append(dct_scale(box[2], box[3], size, size))
        torch.manual_seed(k)
        plain_views.append(plain_t(open_rgb(io.BytesIO(data))))
        torch.manual_seed(k)
        fast_views.append(fast_t(encoded))
    a, b = torch.stack(plain_views), torch.stack(fast_views)  # (N, 3, S, S)
    levels = (a - b).abs().mean(dim=(1, 2, 3)) * 0.226 * 255  # per-sample mean abs difference, 8-bit levels
    assert levels.max() < (0.5 if size == 224 else 8.0), levels.max()  # 64 px: crop edges on the reduced grid
    assert max(scales) == max_scale and (size == 224 or sum(s > 1 for s in scales) > 30)
    for stat in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
        assert torch.allclose(stat(a), stat(b), atol=0.01), (stat(a), stat(b))  # ~0.6 levels


def test_crop_box_distribution_matches_torchvision():
    """Independent draws (different seeds) of our boxes and torchvision's: the area and aspect
    distributions agree (two-sample KS statistic below the 1% critical value)."""
    rrc = T.RandomResizedCrop(224, scale=(0.2, 1.0))
    ours, theirs = [], []
    g = torch.Generator().manual_seed(0)
    for i in range(2000):
        torch.manual_seed(i)
        _, _, h, w = crop_params(375, 500, (0.2, 1.0), (3 / 4, 4 / 3))
        ours.append((h * w / (375 * 500), math.log(w / h)))
        torch.manual_seed(10_000 + int(torch.randint(0, 10**6, (1,), generator=g)))
        p = rrc.make_params([torch.empty(3, 375, 500)])
        theirs.append((p["height"] * p["width"] / (375 * 500), math.log(p["width"] / p["height"])))
    for j in range(2):
        x, y = np.sort([o[j] for o in ours]), np.sort([t[j] for t in theirs])
        grid = np.concatenate([x, y])
        ks = np.abs(np.searchsorted(x, grid, "right") / len(x) - np.searchsorted(y, grid, "right") / len(y)).max()
        assert ks < 1.63 * math.sqrt(2 / 2000), (j, ks)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_before_cropping(orientation):
    stored = Image.new("RGB", (40, 20), (220, 30, 30))
    stored.paste((30, 30, 220), (20, 0, 40, 20))
    stored.paste((30, 220, 30), (0, 0, 8, 6))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    encoded = EncodedImage.open(buf.getvalue(), "photo.jpg")
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))).astype(int)
    assert encoded.size == (upright.shape[1], upright.shape[0])
    assert np.abs(encoded.decode().permute(1, 2, 0).numpy().astype(int) - upright).max() <= 1


def test_other_images_keep_the_pil_path_and_broken_ones_are_named():
    """CMYK JPEGs and PNGs come back decoded (PIL's conversions); a truncated JPEG (no end marker)
    goes through PIL too, which names it."""
    cmyk, png, good = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, "JPEG")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, "PNG")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    assert isinstance(EncodedImage.open(good.getvalue(), "good.jpg"), EncodedImage)
    for data in (cmyk.getvalue(), png.getvalue()):
        img = EncodedImage.open(data, "x")
        assert isinstance(img, Image.Image) and img.mode == "RGB"
    with pytest.raises(OSError, match="cut.jpg"):
        EncodedImage.open(good.getvalue()[: len(good.getvalue()) * 3 // 4], "cut.jpg")  # header intact, scan cut
    with pytest.raises(OSError, match="text.jpg"):
        EncodedImage.open(b"not an image", "text.jpg")


def test_folder_hands_encoded_jpegs_only_to_transforms_that_take_them(tmp_path):
    from ssl_kit.data import SSLDataModule

    Image.new("RGB", (48, 40), (200, 10, 10)).save(tmp_path / "a.jpg")
    Image.new("RGB", (48, 40), (10, 200, 10)).save(tmp_path / "b.png")
    dm = SSLDataModule(root=str(tmp_path), val_fraction=0.0, batch_size=1)
    seen = []

    class Probe:
        accepts_encoded = True

        def __call__(self, img):
            seen.append(type(img).__name__)
            return 0

    dm.split("train", Probe())[0], dm.split("train", Probe())[1]
    dm.split("train", lambda img: seen.append(type(img).__name__))[0]
    assert seen == ["EncodedImage", "Image", "Image"]


# --- the GPU decoder's batch path -------------------------------------------------------------------
def _gpu_path_vs_cpu(jpegs, device: str) -> float:
    from torch.utils.data import default_collate

    from ssl_kit.data.gpu_decode import GpuDecode, PendingBatch

    t = fast(224)
    wrapped, cpu, pending = GpuDecode(t), [], []
    for k, data in enumerate(jpegs):
        encoded = EncodedImage.open(data, f"img{k}")
        torch.manual_seed(k)
        cpu.append(t(encoded))
        torch.manual_seed(k)
        pending.append((wrapped(encoded), k))
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (9, 99, 199)).save(png, "PNG")
    torch.manual_seed(99)
    pending.append((wrapped(EncodedImage.open(png.getvalue(), "x.png")), 99))  # finished on the CPU, rides along
    views, labels = default_collate(pending)
    assert isinstance(views, PendingBatch) and labels.tolist() == list(range(len(jpegs))) + [99]
    out = views.to(device).cpu()
    torch.manual_seed(99)
    assert torch.allclose(out[-1], t(Image.open(png)), atol=1e-5)
    return ((out[:-1] - torch.stack(cpu)).abs().mean(dim=(1, 2, 3)) * 0.226 * 255).max().item()


def test_gpu_decode_batch_path_matches_the_cpu_views(jpegs):
    """The batch path with the device set to the CPU: same crops, flips and EXIF handling as the
    worker path; pixels within rounding (float resize here, uint8 there)."""
    assert _gpu_path_vs_cpu(jpegs[:6], "cpu") < 0.5


@pytest.mark.gpu
@requires_cuda
def test_gpu_decode_on_cuda_matches_the_cpu_views(jpegs):
    """nvJPEG's decode and the GPU resize agree with the CPU path within a level or two per pixel."""
    assert _gpu_path_vs_cpu(jpegs[:6], "cuda") < 2.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_path_applies_exif_orientation(orientation):
    from torchvision.io import ImageReadMode, decode_jpeg

    from ssl_kit.data.gpu_decode import upright

    stored = Image.new("RGB", (40, 20), (220, 30, 30))
    stored.paste((30, 220, 30), (0, 0, 8, 6))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif, quality=95)
    raw = decode_jpeg(torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8), mode=ImageReadMode.RGB)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
    assert np.array_equal(upright(raw, orientation).permute(1, 2, 0).numpy(), expected)

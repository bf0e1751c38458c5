"""Multi-crop views with SimCLR/BYOL augmentations and optional saliency-based background removal.

Used by ReLICv2 (Tomasev et al., 2022, arXiv:2201.05119): ``n_large`` large crops and ``n_small``
small crops per image. The photometric part (colour jitter, grayscale, blur, solarize, normalise)
is described once by :class:`Photometric` and built either as a per-image torchvision pipeline
(CPU data workers) or as a batched kornia pipeline with per-sample random parameters (GPU,
:class:`BatchedPhotometric`), so both paths draw from the same distributions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import kornia.augmentation as K
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2 as T

from ssl_kit.data.datasets import scan_images
from ssl_kit.data.decode import RandomResizedCropFlip, as_pil
from ssl_kit.errors import UserError
from ssl_kit.views.basic import IMAGENET_MEAN, IMAGENET_STD

#: ``img.info`` key where ImageFolder records an image's path relative to the data root.
RELPATH_KEY = "relpath"


@dataclass(frozen=True)
class Photometric:
    """One view's photometric augmentation (BYOL Table 6 values by default).

    Args:
        jitter_p: probability of colour jitter.
        brightness, contrast, saturation, hue: colour-jitter strengths (torchvision semantics).
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of Gaussian blur (kernel ~10% of the side, sigma in ``blur_sigma``).
        blur_sigma: blur sigma range.
        solarize_p: probability of solarizing at 0.5 (inputs in [0, 1]).
    """

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def torchvision(self, size: int) -> T.Compose:
        """Per-image pipeline for a (C, H, W) float tensor in [0, 1]; ends normalised."""
        jitter = T.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue)
        return T.Compose([
            T.RandomApply([jitter], p=self.jitter_p),
            T.RandomGrayscale(self.grayscale_p),
            T.RandomApply([T.GaussianBlur(blur_kernel(size), self.blur_sigma)], p=self.blur_p),
            T.RandomSolarize(0.5, p=self.solarize_p),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def kornia(self, size: int) -> nn.Sequential:
        """Batched pipeline for (B, C, H, W) float tensors in [0, 1]; per-sample random parameters."""
        return nn.Sequential(
            K.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue, p=self.jitter_p),
            K.RandomGrayscale(p=self.grayscale_p),
            K.RandomGaussianBlur(blur_kernel(size), self.blur_sigma, p=self.blur_p),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=self.solarize_p),
            K.Normalize(torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)),
        )


#: BYOL's two asymmetric view settings; multi-crop views alternate between them.
BYOL_VIEWS = (Photometric(blur_p=1.0, solarize_p=0.0), Photometric(blur_p=0.1, solarize_p=0.2))


def view_photometric(v: int, views: Sequence[Photometric] = BYOL_VIEWS) -> Photometric:
    """View ``v``'s photometric setting: ``views`` cycled over view indices. The CPU transform and
    the GPU pipelines both call this, so view ``v`` draws from one distribution on either path."""
    return views[v % len(views)]


#: kornia parameters drawn once per batch, not per sample (ColorJitter's order of the four adjustments).
BATCH_WIDE_PARAMS = frozenset({"order"})


class BatchedPhotometric:
    """The photometric step of every view batched with kornia (the GPU path): view ``v`` of size
    ``sizes[v]`` gets :meth:`Photometric.kornia` of :func:`view_photometric`, parameters drawn per sample.

    The parameters are drawn apart from the images (:meth:`draw`) and for any number of samples,
    so a process can draw them for the whole global batch and apply only its own rows.

    Args:
        sizes: each view's side, in view order.
        views: photometric settings cycled over view indices (default: BYOL's two).

    Examples:
        >>> gpu = BatchedPhotometric([32, 16])
        >>> views = gpu([torch.rand(4, 3, 32, 32), torch.rand(4, 3, 16, 16)], gpu.draw(4))
    """

    def __init__(self, sizes: Sequence[int], views: Sequence[Photometric] = BYOL_VIEWS) -> None:
        self.sizes = list(sizes)
        self.pipelines = [view_photometric(v, views).kornia(s) for v, s in enumerate(self.sizes)]

    def draw(self, n: int, generator: torch.Generator | None = None) -> list[list[dict[str, Tensor]]]:
        """Every op's parameters for ``n`` samples of every view, one row per sample (a parameter
        kornia draws once per batch is repeated on every row).

        kornia draws from the global CPU RNG only: with ``generator`` it draws under a fork of that
        RNG seeded from ``generator``, so the result is a function of ``generator`` and the caller's
        RNG state is left as it was. Without, it draws from the global RNG.

        Shapes:
            returns V x ops x {name: (n, ...)}
        """
        if generator is None:
            return self._draw(n)
        seed = int(torch.randint(2**63 - 1, (), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self._draw(n)

    def _draw(self, n: int) -> list[list[dict[str, Tensor]]]:
        drawn = []
        for pipeline, size in zip(self.pipelines, self.sizes):
            drawn.append([])
            for op in pipeline:
                params = op.forward_parameters(torch.Size((n, 3, size, size)))
                del params["forward_input_shape"]  # the shape of the batch it is applied to, set then
                for name, value in params.items():
                    if name in BATCH_WIDE_PARAMS:
                        params[name] = value.expand(n, *value.shape)  # (n, ...): any row gives it back
                    elif value.shape[:1] != (n,):
                        raise RuntimeError(f"kornia's {type(op).__name__} parameter {name!r} of shape "
                                           f"{tuple(value.shape)} is neither per sample nor known as per batch.")
                drawn[-1].append(params)
        return drawn

    def __call__(self, views: Sequence[Tensor], params: list[list[dict[str, Tensor]]]) -> list[Tensor]:
        """Augment and normalise each view with ``params`` (from :meth:`draw`, one row per sample).

        Shapes:
            views: V x (B, C, H, W) in [0, 1]; params: V x ops x {name: (B, ...)} -> V x (B, C, H, W).
        """
        out = []
        for x, pipeline, view_params in zip(views, self.pipelines, params):
            for op, op_params in zip(pipeline, view_params):
                # drawn on the CPU (kornia's generator): moved to the view's device before use
                op_params = {k: (v[0] if k in BATCH_WIDE_PARAMS else v).to(x.device) for k, v in op_params.items()}
                x = op(x, params={**op_params, "forward_input_shape": torch.tensor(x.shape)})
            out.append(x)
        return out


def blur_kernel(size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the crop side (BYOL: 23 px at 224), at least 3."""
    k = max(3, int(round(size / 10)))
    return k if k % 2 else k + 1


def check_multicrop(n_large: int, n_small: int, large_size: int, small_size: int, p_m: float) -> None:
    """Raise a ValueError naming the bad value before any data is read."""
    if n_large < 1:
        raise UserError(f"n_large={n_large} is not allowed: ReLICv2 needs at least one large crop "
                         "(large crops are the targets of every pair).")
    if n_small < 0:
        raise UserError(f"n_small={n_small} is not allowed: use n_small >= 0.")
    if n_small > 0 and small_size > large_size:
        raise UserError(f"small crop size {small_size} is larger than the large crop size {large_size}: "
                         "use small_size <= img_size.")
    if not 0.0 <= p_m <= 1.0:
        raise UserError(f"p_m={p_m} is not allowed: the saliency-masking probability must be in [0, 1].")


class SaliencyMasks:
    """Precomputed saliency masks matched to images by relative path (extension ignored):
    ``masks/a/b.png`` belongs to ``images/a/b.jpg``. White (> 127) is foreground.

    Args:
        root: folder of mask images (any PIL-readable format, any size; resized to the image).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index = {_stem(p.relative_to(self.root).as_posix()): p for p in scan_images(self.root)}

    def count_matches(self, relpaths: Iterable[str]) -> tuple[int, int]:
        """(matched, total) over image paths relative to the data root."""
        relpaths = list(relpaths)
        return sum(_stem(r) in self.index for r in relpaths), len(relpaths)

    def check(self, relpaths: Iterable[str]) -> int:
        """Raise if no image has a mask; return how many do."""
        matched, total = self.count_matches(relpaths)
        if matched == 0:
            example = next(iter(self.index), "?")
            raise UserError(f"saliency_root {str(self.root)!r} matches no training image: 0 of {total} matched "
                             f"(masks are matched by path relative to the data root without extension, "
                             f"e.g. mask {example!r}). Check the folder layout or drop saliency_root.")
        return matched

    def remove_background(self, img: Image.Image) -> Image.Image | None:
        """The image with its background set to black, or None when it has no mask."""
        path = self.index.get(_stem(img.info.get(RELPATH_KEY, "")))
        if path is None:
            return None
        img = as_pil(img)  # an undecoded JPEG is decoded in full only when it has a mask
        with Image.open(path) as m:
            mask = m.convert("L").resize(img.size, Image.NEAREST).point(lambda v: 255 if v > 127 else 0)
        return Image.composite(img, Image.new("RGB", img.size), mask)


def _stem(relpath: str) -> str:
    return relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath


class MultiCropTransform:
    """Map one PIL image to ``n_large`` large views then ``n_small`` small views (a list of tensors).

    Each view: RandomResizedCrop (bicubic) + horizontal flip, then, unless ``photometric=False``
    (the GPU path applies it batched with :meth:`Photometric.kornia`), view ``v``'s photometric
    augmentation ``views[v % len(views)]`` and normalisation. With ``saliency`` each large crop is
    taken from the background-removed image with probability ``p_m``.

    Args:
        n_large: large crops (>= 1).
        n_small: small crops (>= 0).
        large_size: side of large crops.
        small_size: side of small crops (<= ``large_size``).
        large_scale: RandomResizedCrop area range of large crops.
        small_scale: RandomResizedCrop area range of small crops.
        saliency: precomputed masks, or None.
        p_m: probability that a large crop comes from the background-removed image.
        photometric: apply colour/blur/solarize/normalise here (CPU path) or leave it to the GPU.
        views: photometric settings cycled over view indices (default: BYOL's two).

    Examples:
        >>> t = MultiCropTransform(n_large=2, n_small=1, large_size=32, small_size=16)
        >>> [v.shape for v in t(Image.new("RGB", (40, 40)))]
        [torch.Size([3, 32, 32]), torch.Size([3, 32, 32]), torch.Size([3, 16, 16])]
    """

    def __init__(
        self, n_large: int = 4, n_small: int = 2, large_size: int = 224, small_size: int = 96,
        large_scale: Sequence[float] = (0.14, 1.0), small_scale: Sequence[float] = (0.05, 0.14),
        saliency: SaliencyMasks | None = None, p_m: float = 0.0, photometric: bool = True,
        views: Sequence[Photometric] = BYOL_VIEWS,
    ) -> None:
        check_multicrop(n_large, n_small, large_size, small_size, p_m)
        self.n_large, self.n_small, self.saliency, self.p_m = n_large, n_small, saliency, p_m
        self.sizes = [large_size] * n_large + [small_size] * n_small
        scales = [tuple(large_scale)] * n_large + [tuple(small_scale)] * n_small
        self.geometric = [_geometric(s, sc) for s, sc in zip(self.sizes, scales)]
        self.photometric = [view_photometric(v, views).torchvision(s) if photometric else T.Identity()
                            for v, s in enumerate(self.sizes)]

    #: Takes an undecoded JPEG (:class:`ssl_kit.data.decode.EncodedImage`): views decode only what they crop.
    accepts_encoded = True

    def __call__(self, img: Image.Image) -> list[Tensor]:
        removed = self.saliency.remove_background(img) if self.saliency is not None and self.p_m > 0 else None
        out = []
        for v, (geometric, photometric) in enumerate(zip(self.geometric, self.photometric)):
            source = img
            if removed is not None and v < self.n_large and random.random() < self.p_m:
                source = removed
            out.append(photometric(geometric(source)))
        return out


def _geometric(size: int, scale: tuple[float, float]) -> RandomResizedCropFlip:
    # RandomResizedCrop (bicubic) + flip, in [0, 1]: the uint8 bicubic resize clips like PIL's.
    return RandomResizedCropFlip(size, scale=scale)

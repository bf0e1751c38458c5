"""Image sources: a folder of images, scikit-learn's bundled digits, and a synthetic set."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ssl_kit.data.rgb import open_rgb
from ssl_kit.errors import MissingFileError, UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
UNLABELED = -1


class LabeledImages(Dataset):
    """Base for datasets of PIL images with integer labels (``UNLABELED`` when unknown).

    Subclasses implement ``__len__``, :meth:`load` and set ``labels`` / ``classes``.
    """

    classes: list[str]
    labels: Sequence[int]

    def __init__(self, transform: Callable | None = None) -> None:
        self.transform = transform

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def load_encoded(self, index: int):
        """The image for a transform with ``accepts_encoded`` (see :mod:`ssl_kit.data.decode`): an
        undecoded :class:`~ssl_kit.data.decode.EncodedImage` where the source has JPEG bytes, else
        :meth:`load`'s PIL image. Unreadable images raise ``OSError`` here, as in :meth:`load`."""
        return self.load(index)

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.labels[index]

    @property
    def has_labels(self) -> bool:
        return len(self.labels) > 0 and min(self.labels) >= 0


def scan_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root``, recursively, in sorted order (symlinks followed)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"data root {str(root)!r} does not exist or is not a directory.")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise MissingFileError(
            f"data root {str(root)!r} holds no images (searched recursively for {', '.join(IMG_EXTENSIONS)})."
        )
    return files


class ImageFolder(LabeledImages):
    """All images under ``root`` (recursive). When every image sits inside a first-level
    sub-folder, that sub-folder names its class; otherwise the images are unlabelled.

    Args:
        root: folder to scan.
        transform: applied to each PIL image.
        classes: fix the class list (e.g. the training split's) instead of reading it from ``root``.
    """

    def __init__(self, root: str, transform: Callable | None = None, classes: list[str] | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.files = scan_images(root)
        parts = [f.relative_to(self.root).parts for f in self.files]
        if all(len(p) >= 2 for p in parts):
            found = sorted({p[0] for p in parts})
            self.classes = list(classes) if classes is not None else found
            index = {c: i for i, c in enumerate(self.classes)}
            unknown = sorted(set(found) - set(index))
            if unknown:
                raise UserError(f"{root!r} has class folders {unknown[:5]} absent from the training classes.")
            self.labels = [index[p[0]] for p in parts]
        else:
            self.classes = []
            self.labels = [UNLABELED] * len(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        img = open_rgb(self.files[index])
        # Transforms that need per-image side data (ReLICv2's saliency masks) look it up by this path.
        img.info["relpath"] = self.files[index].relative_to(self.root).as_posix()
        return img

    def load_encoded(self, index: int):
        from ssl_kit.data.decode import EncodedImage  # decode.py builds on this module

        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise OSError(f"cannot read image {str(path)!r}: {err}") from err
        return EncodedImage.open(data, str(path), info={"relpath": path.relative_to(self.root).as_posix()})


class Digits(LabeledImages):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), upsampled to
    ``size`` pixels and made RGB. Ships inside scikit-learn: nothing is downloaded.

    Args:
        size: output side in pixels.
        transform: applied to each PIL image.
    """

    def __init__(self, size: int = 32, transform: Callable | None = None) -> None:
        super().__init__(transform)
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # (N, 8, 8)
        self.images = [
            Image.fromarray(g, mode="L").resize((size, size), Image.BICUBIC).convert("RGB") for g in gray
        ]
        self.labels = digits.target.astype(int).tolist()
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return self.images[index]


class SyntheticImages(LabeledImages):
    """Deterministic random images with learnable class structure, for tests and benchmarks.

    Each class has its own colour and stripe orientation; noise differs per index.

    Args:
        num_images: dataset length.
        size: image side in pixels.
        num_classes: label count.
        seed: base seed; image ``i`` is a pure function of (seed, i).
        transform: applied to each PIL image.
    """

    def __init__(
        self, num_images: int = 256, size: int = 32, num_classes: int = 4, seed: int = 0,
        transform: Callable | None = None,
    ) -> None:
        super().__init__(transform)
        self.num_images, self.size, self.seed = num_images, size, seed
        self.labels = [i % num_classes for i in range(num_images)]
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_images

    def load(self, index: int) -> Image.Image:
        label = self.labels[index]
        rng = np.random.default_rng((self.seed, index))
        class_rng = np.random.default_rng((self.seed, 10_000 + label))
        colour = class_rng.uniform(40, 215, size=3)
        yy, xx = np.mgrid[0 : self.size, 0 : self.size]
        angle = np.pi * label / max(1, len(self.classes))
        stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.6 + rng.uniform(0, 6.3))
        img = colour + 40 * stripes[..., None] + rng.normal(0, 20, size=(self.size, self.size, 3))
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")

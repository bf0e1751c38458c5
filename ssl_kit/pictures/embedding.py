"""A 2-D t-SNE map of pooled features, one dot per image, coloured by label."""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from sklearn.manifold import TSNE
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ssl_kit.pictures.canvas import BACKGROUND, TEXT, font, label_colour

#: Classes named in the legend; more are drawn but not listed.
MAX_LEGEND = 20


@torch.inference_mode()
def pooled_features(encode: Callable[[Tensor], Tensor], dataset: Dataset, batch_size: int = 64,
                    num_workers: int = 0, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``encode`` over every item of ``dataset`` with a progress bar (bf16 autocast on CUDA).

    Shapes:
        returns features (N, D) float32 on CPU and labels (N,) int64.
    """
    device = torch.device(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats, labels = [], []
    for imgs, y in tqdm(loader, desc="features", unit="batch", file=sys.stderr, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            feats.append(encode(imgs.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).long()


def tsne_2d(feats: Tensor, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """t-SNE (scikit-learn, PCA init) of L2-normalised features, the cosine geometry k-NN uses.

    The perplexity is capped at (N - 1) / 3 so small sets work.

    Shapes:
        feats: (N, D) -> (N, 2)
    """
    x = torch.nn.functional.normalize(feats.float(), dim=1).numpy()
    perplexity = min(perplexity, max(1.0, (x.shape[0] - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed).fit_transform(x)


def scatter_picture(points: np.ndarray, labels: Tensor, classes: list[str] | None, title: str,
                    size: int = 420) -> Image.Image:
    """Dots at ``points`` (scaled into a ``size`` square) coloured by label, with a legend.

    Unlabelled points (``classes`` None or a negative label) are grey.

    Shapes:
        points: (N, 2); labels: (N,)
    """
    f = font(12)
    legend = list(classes or [])[:MAX_LEGEND]
    legend_w = (max(int(f.getlength(c)) for c in legend) + 28) if legend else 0
    margin, top = 10, 22
    canvas = Image.new("RGB", (size + 2 * margin + legend_w, size + top + margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 4), title, fill=TEXT, font=f)
    lo, hi = points.min(0), points.max(0)
    xy = (points - lo) / np.maximum(hi - lo, 1e-12) * (size - 8) + 4  # (N, 2) in pixels
    for (x, y), label in zip(xy, labels.tolist()):
        colour = label_colour(label) if classes and label >= 0 else (120, 120, 120)
        draw.ellipse((margin + x - 3, top + y - 3, margin + x + 3, top + y + 3), fill=colour)
    for i, name in enumerate(legend):
        y = top + 4 + i * 16
        draw.rectangle((size + 2 * margin, y + 2, size + 2 * margin + 10, y + 12), fill=label_colour(i))
        draw.text((size + 2 * margin + 16, y), name, fill=TEXT, font=f)
    if classes and len(classes) > MAX_LEGEND:
        draw.text((size + 2 * margin, top + 4 + MAX_LEGEND * 16), f"... {len(classes)} classes", fill=TEXT, font=f)
    return canvas


def embedding_picture(feats: Tensor, labels: Tensor, classes: list[str] | None, seed: int = 0) -> tuple[Image.Image, str]:
    """t-SNE of ``feats`` drawn as a labelled scatter; returns the picture and a description.

    Shapes:
        feats: (N, D); labels: (N,)
    """
    points = tsne_2d(feats, seed)
    coloured = "coloured by label" if classes else "no labels"
    note = f"{feats.shape[0]} images, {feats.shape[1]}-d pooled features, {coloured}"
    return scatter_picture(points, labels, classes, f"t-SNE ({note})"), note

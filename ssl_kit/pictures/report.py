"""Write every picture of an encoder and the HTML page gathering them."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ssl_kit.pictures.attention import attention_picture, last_attention_module
from ssl_kit.pictures.embedding import embedding_picture, pooled_features
from ssl_kit.pictures.pca import PCA_IMAGES, pca_picture
from ssl_kit.pictures.reconstructions import reconstruction_picture

#: What each picture shows, as the HTML page explains it.
CAPTIONS = {
    "pca.png": "First three principal components of the patch features as red, green and blue, fitted jointly "
               "over the first images of the split after removing each location's mean over them (the "
               "position embedding's share). Regions the encoder represents alike share a colour.",
    "embedding.png": "t-SNE of the pooled features (the vector the k-NN and linear evaluators read). "
                     "Well-separated colours mean labels are recoverable without training the encoder.",
    "reconstructions.png": "Masked input (removed patches grey), the model's reconstruction with the visible "
                           "patches pasted back, and the original.",
    "attention.png": "Attention weights of the last block per head, each map scaled to its own maximum.",
}


@dataclass
class ReportInputs:
    """What the pictures are drawn from.

    Attributes:
        encoder: a timm model (``forward_features``; ``num_classes=0``).
        dataset: evaluation-transformed images and labels (the first ``num_images`` go in the grids).
        encode: pooled features for the t-SNE (default: ``encoder`` itself).
        classes: class names when the labels are real, else None.
        reconstructor: a module with ``reconstruct(imgs)`` and ``patch_size`` (MAE, FCMAE), or None.
        eval_json: an ``eval.json`` whose k-NN / linear figures the page shows, if it exists.
        title: the page's heading (e.g. the checkpoint path).
        notes: facts listed under the heading (architecture, input size, data, ...).
    """

    encoder: nn.Module
    dataset: Dataset
    encode: Callable[[Tensor], Tensor] | None = None
    classes: list[str] | None = None
    reconstructor: nn.Module | None = None
    eval_json: Path | None = None
    title: str = "encoder"
    notes: dict[str, str] = field(default_factory=dict)


def write_report(output: str | Path, inputs: ReportInputs, num_images: int = 8, max_points: int = 2000,
                 pca_size: int | None = None, seed: int = 0, device: torch.device | str = "cpu",
                 batch_size: int = 64, num_workers: int = 0) -> Path:
    """Write ``pca.png``, ``embedding.png``, ``attention.png`` (ViTs), ``reconstructions.png``
    (with a reconstructor) and ``report.html`` into ``output``; returns the HTML's path.

    Args:
        output: the report folder (created).
        inputs: encoder, images and what else the pictures need.
        num_images: images in the grids.
        max_points: at most this many images (evenly spaced over the dataset) in the t-SNE.
        pca_size: input side for the PCA picture (see :func:`~ssl_kit.pictures.pca.pca_input_size`).
        seed: seed of the t-SNE and of the reconstructions' masks.
        device: where the encoder runs.
        batch_size, num_workers: feature extraction loader.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    n = len(inputs.dataset)
    fit = torch.stack([inputs.dataset[i][0] for i in range(min(max(num_images, PCA_IMAGES), n))]).to(device)
    imgs = fit[:num_images]  # (B, 3, H, W): the images of every grid
    pictures = {"pca.png": pca_picture(inputs.encoder, fit, pca_size, num_shown=num_images)}
    step = max(1, -(-n // max_points))  # ceil: evenly spaced, at most max_points
    feats, labels = pooled_features(inputs.encode or inputs.encoder, Subset(inputs.dataset, range(0, n, step)),
                                    batch_size, num_workers, device)
    pictures["embedding.png"] = embedding_picture(feats, labels, inputs.classes, seed)
    if inputs.reconstructor is not None:
        pictures["reconstructions.png"] = reconstruction_picture(inputs.reconstructor, imgs, seed)
    if last_attention_module(inputs.encoder) is not None:
        pictures["attention.png"] = attention_picture(inputs.encoder, imgs)
    for name, (image, _) in pictures.items():
        image.save(out / name, optimize=True)
    page = out / "report.html"
    _write_atomic(page, render_html(inputs, {k: note for k, (_, note) in pictures.items()}))
    return page


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_html(inputs: ReportInputs, notes: dict[str, str]) -> str:
    """The page: the encoder, its evaluation figures (if ``eval_json`` exists), every picture."""
    e = html.escape
    details = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in inputs.notes.items())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ssl_kit show: {e(inputs.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:70em;margin:1em auto}img{max-width:100%;"
             "image-rendering:pixelated}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:.2em .6em;text-align:right}</style></head><body>",
             f"<h1>What {e(inputs.title)} learned</h1><ul>{details}</ul>", eval_table(inputs.eval_json)]
    for name, note in notes.items():
        parts.append(f"<h2>{e(name)}</h2><p><img src='{e(name)}' alt='{e(name)}'></p>"
                     f"<p>{e(CAPTIONS[name])} <em>{e(note)}</em></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def eval_table(path: Path | None) -> str:
    """k-NN / linear / fine-tune top-1 and top-5 per encoder row of an ``eval.json``, as HTML."""
    if path is None or not Path(path).is_file():
        return "<p>No eval.json beside the checkpoint: no k-NN / linear figures to show.</p>"
    results = json.loads(Path(path).read_text())
    rows = [name for name in ("pretrained", "random_init", "pixels") if isinstance(results.get(name), dict)]
    protocols = [p for p in ("knn", "linear", "finetune") if any(p in results[r] for r in rows)]
    head = "".join(f"<th>{p} top-1 / top-5</th>" for p in protocols)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{results[r][p]['top1']:.2f} / {results[r][p]['top5']:.2f}</td>" if p in results[r]
                        else "<td>-</td>" for p in protocols)
        body += f"<tr><th>{html.escape(r)}</th>{cells}</tr>"
    proto = results.get("protocol", {})
    caption = f"From {html.escape(str(path))} (held-out split; k-NN k={proto.get('k')}, T={proto.get('temperature')})."
    return f"<h2>Evaluation</h2><table><tr><th>encoder</th>{head}</tr>{body}</table><p>{caption}</p>"

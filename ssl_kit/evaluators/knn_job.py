"""``python -m ssl_kit knn``: weighted k-NN classification of frozen features from any encoder."""

from __future__ import annotations

from dataclasses import dataclass

import json
import os
import time
from pathlib import Path
from typing import final

import torch
from lightning_fabric import Fabric

from ssl_kit.backbones.convnextv2_sparse import fast_grn_
from ssl_kit.data import SSLDataModule, scan_images
from ssl_kit.errors import UserError
from ssl_kit.evaluators.knn import check_ks, knn_accuracies
from ssl_kit.checkpoints.load import load_encoder
from ssl_kit.evaluators.sharded import extract_features_sharded
from ssl_kit.run_dir import writable_file
from ssl_kit.views import EvalTransform


@final
class EvalData(SSLDataModule):
    """:class:`~ssl_kit.data.SSLDataModule`'s arguments as a plain group (``--data.root DIR``),
    for evaluation jobs. ``final`` tells jsonargparse not to ask for a ``class_path``."""


@dataclass
class EvalTrainer:
    """Where an evaluation job runs, spelled as ``fit``'s flags: ``--trainer.devices 8``.

    Args:
        trainer: accelerator, devices and nodes (``--trainer.devices 8``, as for ``fit``).
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1


def check_eval_data(data: SSLDataModule, job: str) -> list[str]:
    """Fail early unless both splits are labelled with the same classes; returns the classes."""
    if data.dataset == "folder" and data.val_root is not None:
        train_classes, val_classes = _class_folders(data.root), _class_folders(data.val_root)
        if train_classes and val_classes and train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:10]
            only_val = sorted(set(val_classes) - set(train_classes))[:10]
            raise UserError(f"{job}: the class lists of data.root ({len(train_classes)} classes) and data.val_root "
                             f"({len(val_classes)}) differ: only in root {only_train}, only in val_root {only_val}.")
    if not data.has_labels():
        where = f"data.root={data.root!r}" if data.dataset == "folder" else f"data.dataset={data.dataset!r}"
        raise UserError(f"{job} needs labelled images, but {where} has none: put every image in a class "
                         f"sub-folder (root/<class>/<image>), for train and val alike.")
    return data.classes()


def _class_folders(root: str) -> list[str]:
    """First-level folders holding images (the classes), as :class:`~ssl_kit.data.ImageFolder` reads them."""
    return sorted({p[0] for f in scan_images(root) if len(p := f.relative_to(root).parts) >= 2})


def default_output(encoder: str) -> Path:
    """``<checkpoint dir>/knn_<checkpoint stem>.json`` for files, ``runs/knn/knn_<name>.json`` for timm names."""
    path = Path(encoder)
    if path.is_file():
        return path.with_name(f"knn_{path.stem}.json")
    return Path("runs/knn") / f"knn_{encoder.replace('/', '_')}.json"


def writable_output(path: Path) -> Path:
    """``path`` once its folder is proven writable (a file is created there), before any feature is computed."""
    return writable_file(path, "the k-NN results", hint="pass --output")


def knn(
    *,
    encoder: str,
    data: EvalData,
    model_name: str | None = None,
    img_size: int | None = None,
    k: list[int] = [10, 20, 100, 200],
    temperature: float = 0.07,
    output: str | None = None,
    trainer: EvalTrainer = EvalTrainer(),
    seed: int = 0,
) -> dict | None:
    """k-NN classification of frozen features: cosine, temperature-weighted votes, top-1/top-5 to JSON.

    The bank is the training split and the queries the validation split, both un-augmented
    (resize, centre crop). Features are extracted under inference mode (bf16 autocast on GPU),
    gathered across ranks under DDP, L2-normalised and searched exactly with faiss once, for the
    largest k. Returns the results on rank 0 (None elsewhere).

    Args:
        encoder: ssl_kit checkpoint, exported .safetensors, official MAE / ConvNeXt V2 checkpoint or
            timm model name (random init, the baseline); see :func:`ssl_kit.load_encoder`.
        data: the images (``--data.root``, ``--data.val_root`` or ``--data.val_fraction``, ...).
        model_name: timm name for checkpoints that do not name their architecture.
        img_size: evaluation resolution (default: the encoder's).
        k: neighbour counts, all from one search (DINO's protocol: 20; also 10, 100, 200).
        temperature: T in the vote weight ``exp(cosine / T)``.
        output: JSON path (default: ``knn_<checkpoint stem>.json`` beside the checkpoint).
        accelerator: ``auto``, ``cpu`` or ``gpu``.
        devices: processes per node (more than one: DDP, features split across them).
        num_nodes: nodes (with ``srun``/``torchrun``).
        seed: seeds the random initialisation of a timm-name encoder.
    """
    path = writable_output(Path(output) if output else default_output(encoder))
    classes = check_eval_data(data, "k-NN")
    ks = check_ks(k, len(data.split("train", None)))
    if temperature <= 0:
        raise UserError(f"temperature={temperature} is not allowed: it must be > 0.")
    fabric = Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                    strategy="ddp" if trainer.devices * trainer.num_nodes > 1 else "auto")
    fabric.launch()
    torch.manual_seed(seed)
    model = fast_grn_(load_encoder(encoder, model_name, img_size)).to(fabric.device)
    size = model.pretrained_cfg["input_size"][-1]
    start = time.perf_counter()
    (bank, bank_y), (query, query_y) = (
        extract_features_sharded(model, data.split(name, EvalTransform(size)), data.eval_batch_size,
                                 data.num_workers, fabric.device)
        for name in ("train", "val")
    )
    extract_s = time.perf_counter() - start
    if fabric.global_rank != 0:
        return None
    start = time.perf_counter()
    accuracy = knn_accuracies(bank, bank_y, query, query_y, ks, temperature, len(classes))
    results = {
        "encoder": str(encoder), "model_name": model_name, "img_size": size,
        "protocol": {"metric": "cosine", "temperature": temperature, "bank": "train", "queries": "val",
                     "num_train": bank.shape[0], "num_val": query.shape[0], "num_classes": len(classes),
                     "feature_dim": bank.shape[1], "world_size": fabric.world_size},
        "knn": {str(kk): acc for kk, acc in accuracy.items()},
        "seconds": {"features": round(extract_s, 3), "search": round(time.perf_counter() - start, 3)},
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
    print(format_results(results, path))
    return results


def format_results(results: dict, path: Path) -> str:
    p = results["protocol"]
    lines = [f"k-NN (cosine, T={p['temperature']}) of {results['encoder']} at {results['img_size']} px: "
             f"{p['num_train']} train / {p['num_val']} val images, {p['num_classes']} classes",
             f"  {'k':>5}{'top-1':>8}{'top-5':>8}"]
    lines += [f"  {k:>5}{r['top1']:>8.2f}{r['top5']:>8.2f}" for k, r in results["knn"].items()]
    lines.append(f"results written to {path}")
    return "\n".join(lines)

"""``python -m ssl_kit show``: pictures of what an encoder learned, gathered in an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ssl_kit.backbones.convnextv2_sparse import fast_grn_
from ssl_kit.errors import UserError
from ssl_kit.evaluators.knn_job import EvalData, EvalTrainer
from ssl_kit.checkpoints import load_encoder
from ssl_kit.pictures import ReportInputs, reconstructor_from_checkpoint, write_report
from ssl_kit.run_dir import writable_dir
from ssl_kit.views import EvalTransform


def show(
    *,
    encoder: str,
    data: EvalData,
    output: str = "report",
    model_name: str | None = None,
    img_size: int | None = None,
    split: Literal["val", "train"] = "val",
    num_images: int = 8,
    max_points: int = 2000,
    pca_size: int | None = None,
    seed: int = 0,
    trainer: EvalTrainer = EvalTrainer(),
) -> Path:
    """Pictures of an encoder: PCA of patch features, t-SNE, reconstructions, attention; report.html.

    Writes into ``output``: ``pca.png`` (first three PCA components of the patch features as RGB:
    ViT patch tokens, a CNN's final feature map), ``embedding.png`` (t-SNE of the pooled features,
    coloured by label when the data has labels), ``reconstructions.png`` (MAE / FCMAE checkpoints:
    masked input, reconstruction with visible patches pasted back, original), ``attention.png``
    (ViTs: class-token attention of the last block per head) and ``report.html``, which also shows
    the k-NN / linear figures of an ``eval.json`` beside the checkpoint.

    Args:
        encoder: ssl_kit checkpoint (any method), exported .safetensors or export folder, official
            MAE / ConvNeXt V2 checkpoint, or timm model name (random init); see :func:`ssl_kit.load_encoder`.
        data: the images (``--data.root DIR``, ``--data.dataset digits``, ...).
        output: the report folder.
        model_name: timm name for checkpoints that do not name their architecture.
        img_size: input resolution (default: the encoder's).
        split: ``val`` (held out) or ``train``: the images drawn from.
        num_images: images in the PCA, reconstruction and attention grids.
        max_points: most images in the t-SNE (evenly spaced over the split).
        pca_size: input side for the PCA picture (default: the encoder's; CNNs whose final map
            would be under 8x8 get the smallest multiple of it that gives 8x8).
        seed: seeds the t-SNE, the reconstructions' masks and a timm-name encoder's random init.
        trainer: where it runs, spelled as for ``fit`` and ``knn``: ``--trainer.accelerator`` ``auto``
            (a GPU if there is one), ``cpu`` or ``gpu``; one process (``devices`` and ``num_nodes`` 1).
    """
    _check_args(num_images, max_points, trainer)
    out = writable_dir(Path(output), "the report", hint="pass --output")
    data.check()  # a bad root fails before the encoder loads
    device = torch.device("cuda" if trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = fast_grn_(load_encoder(encoder, model_name, img_size)).to(device)
    size = model.pretrained_cfg["input_size"][-1]
    dataset = data.split(split, EvalTransform(size))
    if len(dataset) == 0:
        raise UserError(f"the {split!r} split of the data is empty; pass --split train or --data.val_fraction > 0.")
    reconstructor = reconstructor_from_checkpoint(encoder) if Path(encoder).is_file() else None
    inputs = ReportInputs(
        encoder=model, dataset=dataset, classes=data.classes() if data.has_labels() else None,
        reconstructor=reconstructor.to(device) if reconstructor is not None else None,
        eval_json=Path(encoder).parent / "eval.json" if Path(encoder).exists() else None, title=str(encoder),
        notes={"architecture": model.pretrained_cfg.get("architecture", type(model).__name__),
               "input": f"{size} px", "data": f"{data.dataset} {data.root or ''} ({split} split, {len(dataset)} images)"},
    )
    page = write_report(out, inputs, num_images, max_points, pca_size, seed, device, data.eval_batch_size,
                        data.num_workers)
    print(f"report written to {page}")
    return page


def _check_args(num_images: int, max_points: int, trainer: EvalTrainer) -> None:
    if num_images < 1 or max_points < 5:
        raise UserError(f"num_images={num_images}, max_points={max_points} are not allowed: "
                         "num_images >= 1 and max_points >= 5.")
    if trainer.accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise UserError(f"trainer.accelerator={trainer.accelerator!r} is not allowed: use 'auto', 'cpu' or 'gpu'.")
    if (trainer.devices, trainer.num_nodes) != (1, 1):
        raise UserError(f"trainer.devices={trainer.devices}, trainer.num_nodes={trainer.num_nodes} are not allowed: "
                         "show runs in one process (devices 1, num_nodes 1).")

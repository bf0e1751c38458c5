"""End-of-run evaluation: the trained encoder next to the same architecture at random init and
next to raw pixels, with the protocols that fit the method (k-NN, linear probe, short fine-tune)."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_kit.errors import UserError
from ssl_kit.evaluators import extract_features, knn_accuracy
from ssl_kit.evaluators.batchnorm import recalibrate_batchnorm
from ssl_kit.evaluators.features import resolve_bf16, runs_bf16
from ssl_kit.evaluators.finetune import fit_finetune
from ssl_kit.evaluators.linear import fit_linear_probe
from ssl_kit.evaluators.results import write_results
from ssl_kit.views import MaskedImageTransform

#: The rows of the report, in order: the trained encoder and its two baselines.
ENCODERS = ("pretrained", "random_init", "pixels")


class EvalReport(pl.Callback):
    """When ``fit`` ends, scores on the held-out split (training split: the k-NN bank and the
    training set of the probes) for three encoders:

    - ``pretrained``: the trained encoder (:meth:`~ssl_kit.methods.SSLMethod.extract_features`);
    - ``random_init``: the same architecture freshly initialised; its BatchNorm statistics, if it
      has any, are recomputed on the training images first (untrained statistics would make the
      baseline unfairly weak, see :func:`~ssl_kit.evaluators.batchnorm.recalibrate_batchnorm`);
    - ``pixels``: the normalised images themselves, area-resized to at most ``pixels_size`` per
      side (a thumbnail baseline; at full size its linear probe is slow: 20 s on 96 px digits, which
      are 8x8 images upsampled), flattened.

    Protocols: weighted k-NN (cosine, ``k``, ``temperature``); a linear probe on cached features
    (:func:`~ssl_kit.evaluators.linear.fit_linear_probe`: BatchNorm without affine + linear, LARS);
    and, with ``finetune_epochs > 0``, a short end-to-end fine-tune of the encoders
    (:func:`~ssl_kit.evaluators.finetune.fit_finetune`, the protocol masked-image-modelling papers
    judge by; not for pixels). Encoding and fine-tuning run at the run's precision (bf16 autocast
    when it trains ``bf16-mixed``). Prints a table, with the seconds each step took, and writes
    ``<run dir>/<filename>``.

    Args:
        k: neighbours.
        temperature: voting temperature T in ``exp(sim / T)``.
        filename: JSON file written in the run directory.
        seed: seed of the random-init baseline and of the probes.
        linear_epochs: linear-probe epochs on the cached features (0 skips the probe).
        linear_batch_size: linear-probe batch size.
        linear_lr: linear-probe base lr per 256 samples. A LARS step moves each weight matrix by
            about lr x 0.001 of its norm, so a few hundred steps on small data need a far larger
            value than ImageNet's 0.1 x 16384 / 256 over ~7,000 steps. Measured on the digits demos
            (100 epochs): 5 gave MAE 97.8 / ReLICv2 95.5, 50 gave 97.5 / 92.5, 200 gave 96.7 / 94.4.
        finetune_epochs: epochs of the short fine-tune (0 skips it).
        finetune_lr: fine-tune AdamW base lr per 256 images.
        finetune_layer_decay: layer-wise lr decay of the fine-tune (None: one lr for all).
        finetune_batch_size: fine-tune batch size.
        finetune_crop_scale: RandomResizedCrop area range of the fine-tune's training views.
        pixels_size: the longest side of the ``pixels`` row's images (None: as the encoders see them).
    """

    def __init__(
        self, k: int = 20, temperature: float = 0.07, filename: str = "eval.json", seed: int = 0,
        linear_epochs: int = 100, linear_batch_size: int = 256, linear_lr: float = 5.0,
        finetune_epochs: int = 0, finetune_lr: float = 4e-3, finetune_layer_decay: float | None = 0.7,
        finetune_batch_size: int = 64, finetune_crop_scale: tuple[float, float] = (0.35, 1.0),
        pixels_size: int | None = 32,
    ) -> None:
        if pixels_size is not None and pixels_size < 1:
            raise UserError(f"pixels_size={pixels_size} is not allowed: use a side length >= 1, or null.")
        self.k, self.temperature, self.filename, self.seed = k, temperature, filename, seed
        self.linear_epochs, self.linear_batch_size, self.linear_lr = linear_epochs, linear_batch_size, linear_lr
        self.finetune_epochs, self.finetune_lr, self.finetune_layer_decay = finetune_epochs, finetune_lr, finetune_layer_decay
        self.finetune_batch_size, self.finetune_crop_scale = finetune_batch_size, tuple(finetune_crop_scale)
        self.pixels_size = pixels_size

    # --- the three encoders ---------------------------------------------------------------
    def random_init_encoder(self, module: pl.LightningModule, datamodule) -> nn.Module:
        """A fresh encoder of ``module``'s architecture (seeded), BatchNorm recalibrated."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = module.build_encoder().to(module.device)
        recalibrate_batchnorm(encoder, datamodule.eval_dataloader("train"), module.device)
        return encoder.eval()

    @staticmethod
    def with_encoder(module: pl.LightningModule, encoder: nn.Module) -> pl.LightningModule:
        """A shallow copy of ``module`` whose ``encoder`` is replaced (``extract_features`` unchanged)."""
        twin = copy.copy(module)
        twin._modules = dict(module._modules)
        twin.encoder = encoder
        return twin

    def pixels(self, x: Tensor) -> Tensor:
        """The ``pixels`` row's features: ``x`` area-resized so its longest side is at most
        :attr:`pixels_size`, flattened.

        Shapes:
            x: (B, C, H, W) -> (B, C * h * w)
        """
        side = max(x.shape[-2:])
        if self.pixels_size is not None and side > self.pixels_size:
            size = [max(1, round(n * self.pixels_size / side)) for n in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="area")
        return x.flatten(1)

    # --- protocols ------------------------------------------------------------------------
    def frozen_scores(self, encode, module: pl.LightningModule, datamodule,
                      bf16: bool | None = None) -> dict[str, dict[str, float]]:
        """k-NN and (optionally) linear-probe top-1/top-5 of the features ``encode`` gives
        (``bf16``: see :func:`~ssl_kit.evaluators.features.extract_features`)."""
        loaders = (datamodule.eval_dataloader("train"), datamodule.eval_dataloader("val"))
        train, val = (extract_features(encode, loader, module.device, bf16) for loader in loaders)
        results = {"knn": knn_accuracy(*train, *val, k=self.k, temperature=self.temperature)}
        if self.linear_epochs > 0:
            # extract_features returns inference tensors; the probe needs ordinary ones for autograd.
            train, val = [(f.clone(), y.clone()) for f, y in (train, val)]
            results["linear"] = fit_linear_probe(
                train, val, epochs=self.linear_epochs, batch_size=self.linear_batch_size,
                base_lr=self.linear_lr, warmup_epochs=min(10, self.linear_epochs // 10), seed=self.seed,
            )
        return results

    def finetune_score(self, encoder: nn.Module, module: pl.LightningModule, datamodule,
                       bf16: bool | None = None) -> dict[str, float]:
        """Top-1/top-5 after fine-tuning a copy of ``encoder`` (the original is left as it is;
        ``bf16``: bf16 autocast, as in :func:`~ssl_kit.evaluators.finetune.fit_finetune`)."""
        crop = MaskedImageTransform(module.img_size, scale=self.finetune_crop_scale)
        train = DataLoader(datamodule.split("train", crop), batch_size=self.finetune_batch_size, shuffle=True,
                           drop_last=True, num_workers=datamodule.num_workers,
                           generator=torch.Generator().manual_seed(self.seed))
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.inference_mode(False):
            torch.manual_seed(self.seed)
            return fit_finetune(copy.deepcopy(encoder), train, datamodule.eval_dataloader("val"),
                                len(datamodule.classes()), self.finetune_epochs, self.finetune_lr,
                                layer_decay=self.finetune_layer_decay, device=module.device, bf16=bf16)

    def evaluate(self, module: pl.LightningModule, datamodule, bf16: bool | None = None) -> dict[str, dict]:
        """Scores of every row of :data:`ENCODERS`, and ``seconds``: the wall time of each step.
        ``bf16``: encode and fine-tune under bf16 autocast (None: on CUDA only); ``on_fit_end``
        passes the run's own precision (:func:`~ssl_kit.evaluators.features.runs_bf16`)."""
        was_training = module.training
        module.eval()
        seconds: dict[str, float] = {}

        @contextmanager
        def timed(name: str):
            start = time.perf_counter()
            yield
            seconds[name] = round(time.perf_counter() - start, 1)

        with timed("random_init_build"):
            random_encoder = self.random_init_encoder(module, datamodule)
        encoders = {"pretrained": module.extract_features,
                    "random_init": self.with_encoder(module, random_encoder).extract_features,
                    "pixels": self.pixels}
        results = {}
        for name, encode in encoders.items():
            with timed(name):
                results[name] = self.frozen_scores(encode, module, datamodule, bf16)
        if self.finetune_epochs > 0:
            for name, encoder in (("pretrained", module.encoder), ("random_init", random_encoder)):
                with timed(f"{name}_finetune"):
                    results[name]["finetune"] = self.finetune_score(encoder, module, datamodule, bf16)
        module.train(was_training)
        return {**results, "seconds": seconds}

    def protocol(self, bf16: bool = False) -> dict:
        proto = {"k": self.k, "temperature": self.temperature, "bank": "train", "queries": "val",
                 "precision": "bf16 autocast" if bf16 else "fp32",
                 "random_init": "same architecture, seed %d, BatchNorm statistics recomputed on train" % self.seed,
                 "pixels": f"eval images, area-resized to at most {self.pixels_size} px" if self.pixels_size
                 else "eval images as the encoders see them"}
        if self.linear_epochs > 0:
            proto["linear"] = {"epochs": self.linear_epochs, "batch_size": self.linear_batch_size,
                               "base_lr": self.linear_lr, "optimizer": "LARS", "features": "cached, eval transform"}
        if self.finetune_epochs > 0:
            proto["finetune"] = {"epochs": self.finetune_epochs, "batch_size": self.finetune_batch_size,
                                 "base_lr": self.finetune_lr, "layer_decay": self.finetune_layer_decay,
                                 "optimizer": "AdamW",
                                 "views": f"RandomResizedCrop{self.finetune_crop_scale} + flip"}
        return proto

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if not dm.has_labels():
            print(f"{type(self).__name__}: the data has no labels; skipping the k-NN / linear-probe report.")
            return
        with torch.random.fork_rng(devices=[]):  # the report must not shift the run's RNG streams
            bf16 = resolve_bf16(runs_bf16(trainer), pl_module.device)  # what the protocol states is what runs
            results = {"protocol": self.protocol(bf16), **self.evaluate(pl_module, dm, bf16)}
        path = write_results(Path(trainer.default_root_dir) / self.filename, results)
        print(format_report(results, path))


#: The callback's earlier name (k-NN only); kept so existing configs keep working.
KNNReport = EvalReport

#: (protocol key, column title) in the printed table and the demo's results table.
COLUMNS = (("knn", "k-NN"), ("linear", "linear"), ("finetune", "fine-tune"))


def format_report(results: dict, path: Path | None = None) -> str:
    """The report as a fixed-width table: one row per encoder, top-1 / top-5 per protocol."""
    proto = results["protocol"]
    columns = [(key, title) for key, title in COLUMNS if any(key in results[e] for e in ENCODERS if e in results)]
    lines = [f"\nOn the held-out split (k-NN: k={proto['k']}, T={proto['temperature']}, cosine; top-1 / top-5):"]
    lines.append(f"  {'encoder':<14}" + "".join(f"{title:>16}" for _, title in columns))
    for name in ENCODERS:
        if name not in results:
            continue
        r = results[name]
        cells = [f"{r[key]['top1']:7.2f} / {r[key]['top5']:6.2f}" if key in r else f"{'-':>15}" for key, _ in columns]
        lines.append(f"  {name:<14}" + "".join(f"{c:>16}" for c in cells))
    if results.get("seconds"):
        lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()))
    if path is not None:
        lines.append(f"results written to {path}")
    return "\n".join(lines)


def top1(results: dict, encoder: str, protocol: str) -> float | None:
    """``results[encoder][protocol]['top1']``, or None when that protocol was not run."""
    return results.get(encoder, {}).get(protocol, {}).get("top1")

"""End-of-run evaluation: k-NN and a linear probe of the trained encoder next to the same
architecture at random init."""

from __future__ import annotations

import copy
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor

from ssl_kit.evaluators import extract_features, knn_accuracy
from ssl_kit.evaluators.linear import fit_linear_probe
from ssl_kit.evaluators.results import write_results


class EvalReport(pl.Callback):
    """When ``fit`` ends, k-NN and linear-probe top-1/top-5 on the held-out split (training split:
    the k-NN bank and the probe's training set), for the pretrained encoder and for a randomly
    initialised one of the same architecture. Features are extracted once per encoder (eval
    transform); the probe is :func:`~ssl_kit.evaluators.linear.fit_linear_probe` on them (BatchNorm
    without affine + linear, LARS, warm-up + cosine). Prints a table and writes ``<run dir>/<filename>``.

    Args:
        k: neighbours.
        temperature: voting temperature T in ``exp(sim / T)``.
        filename: JSON file written in the run directory.
        seed: seed of the random-init baseline and of the probe.
        linear_epochs: linear-probe epochs on the cached features (0 skips the probe).
        linear_batch_size: linear-probe batch size.
        linear_lr: linear-probe base lr per 256 samples. A LARS step moves each weight matrix by
            about lr x 0.001 of its norm, so a few hundred steps on small data need a far larger
            value than ImageNet's 0.1 x 16384 / 256 over ~7,000 steps (50: measured on the digits demo).
    """

    def __init__(
        self, k: int = 20, temperature: float = 0.07, filename: str = "eval.json", seed: int = 0,
        linear_epochs: int = 100, linear_batch_size: int = 256, linear_lr: float = 50.0,
    ) -> None:
        self.k, self.temperature, self.filename, self.seed = k, temperature, filename, seed
        self.linear_epochs, self.linear_batch_size, self.linear_lr = linear_epochs, linear_batch_size, linear_lr

    def features(self, module: pl.LightningModule, datamodule) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """(train features, labels), (val features, labels) under the eval transform."""
        was_training = module.training
        module.eval()
        train = extract_features(module.extract_features, datamodule.eval_dataloader("train"), module.device)
        val = extract_features(module.extract_features, datamodule.eval_dataloader("val"), module.device)
        module.train(was_training)
        return train, val

    def evaluate(self, module: pl.LightningModule, datamodule) -> dict[str, dict[str, float]]:
        train, val = self.features(module, datamodule)
        results = {"knn": knn_accuracy(*train, *val, k=self.k, temperature=self.temperature)}
        if self.linear_epochs > 0:
            # extract_features returns inference tensors; the probe needs ordinary ones for autograd.
            train, val = [(f.clone(), y.clone()) for f, y in (train, val)]
            results["linear"] = fit_linear_probe(
                train, val, epochs=self.linear_epochs, batch_size=self.linear_batch_size,
                base_lr=self.linear_lr, warmup_epochs=min(10, self.linear_epochs // 10), seed=self.seed,
            )
        return results

    def random_init_copy(self, module: pl.LightningModule) -> pl.LightningModule:
        baseline = copy.copy(module)  # shallow: shares everything but the encoder
        baseline._modules = dict(module._modules)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            baseline.encoder = module.build_encoder().to(module.device)
        return baseline

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        if not dm.has_labels():
            print(f"{type(self).__name__}: the data has no labels; skipping the k-NN / linear-probe report.")
            return
        protocol = {"k": self.k, "temperature": self.temperature, "bank": "train", "queries": "val"}
        if self.linear_epochs > 0:
            protocol["linear"] = {"epochs": self.linear_epochs, "batch_size": self.linear_batch_size,
                                  "base_lr": self.linear_lr, "optimizer": "LARS", "features": "cached, eval transform"}
        with torch.random.fork_rng(devices=[]):  # the report must not shift the run's RNG streams
            results = {
                "protocol": protocol,
                "pretrained": self.evaluate(pl_module, dm),
                "random_init": self.evaluate(self.random_init_copy(pl_module), dm),
            }
        path = write_results(Path(trainer.default_root_dir) / self.filename, results)
        print(format_report(results, path))


#: The callback's earlier name (k-NN only); kept so existing configs keep working.
KNNReport = EvalReport


def format_report(results: dict, path: Path) -> str:
    proto = results["protocol"]
    lines = [f"\nOn the held-out split: k-NN (k={proto['k']}, T={proto['temperature']}, cosine)"
             + (f" and linear probe ({proto['linear']['epochs']} epochs, cached features):" if "linear" in proto else ":")]
    header = f"  {'encoder':<14}{'k-NN top-1':>12}{'top-5':>8}"
    lines.append(header + (f"{'linear top-1':>14}{'top-5':>8}" if "linear" in proto else ""))
    for name in ("pretrained", "random_init"):
        r = results[name]
        row = f"  {name:<14}{r['knn']['top1']:>12.2f}{r['knn']['top5']:>8.2f}"
        if "linear" in r:
            row += f"{r['linear']['top1']:>14.2f}{r['linear']['top5']:>8.2f}"
        lines.append(row)
    lines.append(f"results written to {path}")
    return "\n".join(lines)

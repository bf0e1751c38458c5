"""End-of-run evaluation: k-NN of the trained encoder next to the same architecture at random init."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from ssl_kit.evaluators import extract_features, knn_accuracy


class KNNReport(pl.Callback):
    """When ``fit`` ends, k-NN top-1/top-5 on the held-out split (bank: the training split), for
    the pretrained encoder and for a randomly initialised one of the same architecture. Prints a
    table and writes ``<run dir>/<filename>``.

    Args:
        k: neighbours.
        temperature: voting temperature T in ``exp(sim / T)``.
        filename: JSON file written in the run directory.
        seed: seed of the random-init baseline.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, filename: str = "eval.json", seed: int = 0) -> None:
        self.k, self.temperature, self.filename, self.seed = k, temperature, filename, seed

    def evaluate(self, module: pl.LightningModule, datamodule) -> dict[str, float]:
        device = module.device
        was_training = module.training
        module.eval()
        bank, bank_y = extract_features(module.extract_features, datamodule.eval_dataloader("train"), device)
        query, query_y = extract_features(module.extract_features, datamodule.eval_dataloader("val"), device)
        module.train(was_training)
        return knn_accuracy(bank, bank_y, query, query_y, self.k, self.temperature)

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
            print("KNNReport: the data has no labels; skipping the k-NN report.")
            return
        results = {
            "protocol": {"k": self.k, "temperature": self.temperature, "bank": "train", "queries": "val"},
            "pretrained": {"knn": self.evaluate(pl_module, dm)},
            "random_init": {"knn": self.evaluate(self.random_init_copy(pl_module), dm)},
        }
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(format_report(results, path))


def format_report(results: dict, path: Path) -> str:
    k = results["protocol"]["k"]
    lines = [f"\nk-NN on the held-out split (k={k}, T={results['protocol']['temperature']}, cosine):"]
    lines.append(f"  {'encoder':<14}{'top-1':>8}{'top-5':>8}")
    for name in ("pretrained", "random_init"):
        r = results[name]["knn"]
        lines.append(f"  {name:<14}{r['top1']:>8.2f}{r['top5']:>8.2f}")
    lines.append(f"results written to {path}")
    return "\n".join(lines)

"""Classification results: top-k accuracy, mean ± std over seeds, and the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

METRICS = ("top1", "top5")
RESULTS_FILES = ("linear.json", "finetune.json")


def topk_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent (top-5 is top-C when there are fewer than 5 classes).

    Shapes:
        scores: (N, C) logits or class scores; labels: (N,) -> {"top1", "top5"}
    """
    topk = scores.topk(min(5, scores.shape[1]), dim=1).indices  # (N, 5)
    hits = topk == labels[:, None].to(topk.device)
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1 denominator; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": n}


def seed_summary(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """``{"per_seed": {seed: metrics}, "top1": {mean, std, n}, "top5": {...}}``."""
    summary: dict[str, Any] = {"per_seed": {str(s): m for s, m in per_seed.items()}}
    for metric in METRICS:
        summary[metric] = mean_std([m[metric] for m in per_seed.values()])
    return summary


def format_summary(title: str, summary: dict[str, Any]) -> str:
    """One line per metric: ``top1  75.31 ± 0.12  (3 seeds: 75.2, 75.4, 75.3)``."""
    lines = [title]
    for metric in METRICS:
        stats = summary[metric]
        values = ", ".join(f"{m[metric]:.2f}" for m in summary["per_seed"].values())
        lines.append(f"  {metric}  {stats['mean']:6.2f} ± {stats['std']:.2f}  ({stats['n']} seeds: {values})")
    return "\n".join(lines)


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def aggregate(root: str, output: str | None = None, key: str = "final") -> dict[str, Any]:
    """Combine per-seed runs (``ROOT/*/finetune.json`` or ``linear.json``) into mean ± std.

    Fine-tuning runs one seed per job (``--seed_everything S --trainer.default_root_dir ROOT/seedS``);
    this joins them and writes ``ROOT/seeds.json`` (or ``output``).

    Args:
        root: the directory holding one run directory per seed.
        output: where to write the combined JSON (default ``ROOT/seeds.json``).
        key: the summary to combine (``final``, or ``ema`` for fine-tuning with weight EMA).
    """
    files = sorted(p for pattern in RESULTS_FILES for p in Path(root).glob(f"*/{pattern}"))
    if not files:
        raise FileNotFoundError(f"no run under {root!r} holds {' or '.join(RESULTS_FILES)} (expected ROOT/RUN/FILE).")
    per_seed: dict[int, dict[str, float]] = {}
    for path in files:
        data = json.loads(path.read_text())
        if key not in data:
            raise ValueError(f"{path} has no {key!r} results (found {sorted(data)}).")
        for seed, metrics in data[key]["per_seed"].items():
            if int(seed) in per_seed:
                raise ValueError(f"seed {seed} appears twice (again in {path}); give each run its own --seed_everything.")
            per_seed[int(seed)] = metrics
    summary = seed_summary(per_seed)
    print(format_summary(f"{key}: {len(files)} runs under {root}", summary))
    out = write_results(output or Path(root) / "seeds.json", {key: summary, "runs": [str(p) for p in files]})
    print(f"written to {out}")
    return summary

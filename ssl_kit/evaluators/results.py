"""Classification results: top-k accuracy, mean ± std over seeds, and the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch import Tensor

METRICS = ("top1", "top5")


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


def aggregate(runs: list[str], output: str | None = None, key: str = "final") -> dict[str, Any]:
    """Combine the results JSON of runs that differ only in seed into mean ± std.

    Each run is a results file or a run directory holding one (``linear.json`` / ``finetune.json``).
    Fine-tuning runs one seed per job (``--seed_everything S``, one run directory each); this joins them.

    Args:
        runs: results files or run directories, one per seed.
        output: where to write the combined JSON (default: print only).
        key: the summary to combine (``final``, or ``ema`` for fine-tuning with weight EMA).
    """
    per_seed: dict[int, dict[str, float]] = {}
    for run in runs:
        path = _results_file(Path(run))
        data = json.loads(path.read_text())
        if key not in data:
            raise ValueError(f"{path} has no {key!r} results (found {sorted(data)}).")
        for seed, metrics in data[key]["per_seed"].items():
            if int(seed) in per_seed:
                raise ValueError(f"seed {seed} appears twice ({path}); give each run its own seed.")
            per_seed[int(seed)] = metrics
    summary = seed_summary(per_seed)
    print(format_summary(f"{key}: {len(runs)} runs", summary))
    if output is not None:
        print(f"written to {write_results(output, {key: summary, 'runs': runs})}")
    return summary


def _results_file(run: Path) -> Path:
    if run.is_file():
        return run
    found = sorted(run.glob("linear*.json")) + sorted(run.glob("finetune*.json"))
    if not found:
        raise FileNotFoundError(f"{str(run)!r} is neither a results file nor a run directory holding linear.json/finetune.json.")
    return found[0]

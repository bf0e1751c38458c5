"""Classification results: top-k accuracy, mean ± std over seeds, and the results JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from ssl_kit.errors import MissingFileError, UserError
from ssl_kit.run_dir import writable_file

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


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n - 1 denominator); ``std`` is None for a single value,
    which says nothing about the spread over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def seed_summary(per_seed: dict[int, dict[str, float]]) -> dict[str, Any]:
    """``{"per_seed": {seed: metrics}, "top1": {mean, std, n}, "top5": {...}}``."""
    summary: dict[str, Any] = {"per_seed": {str(s): m for s, m in per_seed.items()}}
    for metric in METRICS:
        summary[metric] = mean_std([m[metric] for m in per_seed.values()])
    return summary


def format_summary(title: str, summary: dict[str, Any]) -> str:
    """One line per metric: ``top1  75.31 ± 0.12  (3 seeds: 75.2, 75.4, 75.3)``; a single run
    reads ``top1  75.31  (1 seed: no std)``."""
    lines = [title]
    for metric in METRICS:
        stats = summary[metric]
        if stats["n"] == 1:
            lines.append(f"  {metric}  {stats['mean']:6.2f}  (1 seed: no std)")
            continue
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
    out = writable_file(Path(output) if output else Path(root) / "seeds.json", "the combined results")
    files = sorted(p for pattern in RESULTS_FILES for p in Path(root).glob(f"*/{pattern}"))
    if not files:
        raise MissingFileError(f"no run under {root!r} holds {' or '.join(RESULTS_FILES)} (expected ROOT/RUN/FILE).")
    per_seed: dict[int, dict[str, float]] = {}
    first: tuple[Path, dict] | None = None
    for path in files:
        data = json.loads(path.read_text())
        first = first or (path, run_identity(path, data))
        check_same_run_kind(first, path, run_identity(path, data))
        if key not in data:
            raise UserError(f"{path} has no {key!r} results (found {sorted(data)}).")
        for seed, metrics in data[key]["per_seed"].items():
            if int(seed) in per_seed:
                raise UserError(f"seed {seed} appears twice (again in {path}); give each run its own --seed_everything.")
            per_seed[int(seed)] = metrics
    summary = seed_summary(per_seed)
    print(format_summary(f"{key}: {len(files)} runs under {root}", summary))
    out = write_results(out, {key: summary, "runs": [str(p) for p in files]})
    print(f"written to {out}")
    return summary


#: Config keys that differ between the seeds of one experiment (paths, the seed itself).
SEED_KEYS = ("seed_everything", "ckpt_path", "trainer.default_root_dir", "trainer.logger", "checkpoint.dirpath",
             "model.init_args.seeds")


def run_identity(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """What must agree for runs to be seeds of one experiment: protocol, encoder and the resolved
    config beside the results (``config.yaml``), minus seeds and paths."""
    identity = {"protocol": data.get("protocol", path.stem), "encoder": data.get("encoder")}
    config = path.parent / "config.yaml"
    if config.is_file():
        flat = _flatten(yaml.safe_load(config.read_text()) or {})
        identity.update({f"config {k}": v for k, v in flat.items() if not k.startswith(SEED_KEYS)})
    return identity


def check_same_run_kind(first: tuple[Path, dict[str, Any]], path: Path, identity: dict[str, Any]) -> None:
    """Refuse to average runs that are not seeds of the same experiment, naming what differs."""
    first_path, reference = first
    keys = list(dict.fromkeys([*reference, *identity]))
    if not (_has_config(reference) and _has_config(identity)):  # compare configs only where both have one
        keys = [k for k in keys if not k.startswith("config ")]
    diff = [k for k in keys if reference.get(k) != identity.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"cannot combine {path} with {first_path}: {k} differs ({identity.get(k)!r} vs "
                        f"{reference.get(k)!r}{f'; {len(diff)} differences' if len(diff) > 1 else ''}); "
                        f"aggregate runs that differ only in their seed.")


def _has_config(identity: dict[str, Any]) -> bool:
    return any(k.startswith("config ") for k in identity)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat

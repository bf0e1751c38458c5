"""``python -m ssl_kit bench``: training throughput, FLOPs and MFU of any config's model.

Parses the same config (and ``--model.*`` / ``--data.*`` / ``--trainer.*`` / ``--speed.*``
flags) as ``fit``, builds only the model, and runs ``--steps`` real Lightning training steps on
one device on a synthetic batch made on the device once (``model.example_batch``), so the data
pipeline is never the bottleneck. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
over one full training step (forward + backward; the optimizer adds no matmul FLOPs).
"""

from __future__ import annotations

import json
import logging
import resource
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser
from torch.utils.flop_counter import FlopCounterMode

from ssl_kit.bench.steps import fit_steps
from ssl_kit.bench.timer import StepTimer, interleaved
from ssl_kit.callbacks import SpeedUp
from ssl_kit.callbacks.speed import auto_precision
from ssl_kit.cli import SSLCLI
from ssl_kit.data import SSLDataModule
from ssl_kit.errors import UserError
from ssl_kit.methods import SSLMethod
from ssl_kit.run_dir import writable_file

#: Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s, matched in order against
#: ``torch.cuda.get_device_name()``; vendor data sheets.
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("A800", 312.0),
)


class _ParseOnlyCLI(SSLCLI):
    """The ``fit`` parser plus bench's flags; parses and validates, instantiates nothing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--steps", type=int, default=20, help="training steps to run (timed: steps - warmup_steps)")
        parser.add_argument("--warmup_steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
        parser.add_argument("--output", type=str | None, default=None, help="JSON path (default runs/bench/<config>.json)")

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def _instantiate_model(model_config: Namespace) -> SSLMethod:
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(SSLMethod, "model")
    return parser.instantiate_classes(Namespace(model=model_config)).model


class _FlopCount(pl.Callback):
    """Counts the FLOPs of the first training step (forward, backward and optimizer step)."""

    total = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = FlopCounterMode(display=False)
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.total = self.mode.get_total_flops()


class _PeakMemoryFrom(pl.Callback):
    """Resets CUDA's peak-memory counter when step ``warmup`` starts: the peak is the timed steps'."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """Best-of-``repeats`` TFLOP/s of an ``n x n`` matmul: the peak used when no table entry applies."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    inner = 10 if device.type == "cuda" else 2

    def matmuls() -> None:
        for _ in range(inner):
            a @ b

    best = min(t.wall for t in interleaved({"matmul": matmuls}, rounds=repeats, device=device)["matmul"])
    return 2 * n**3 * inner / best / 1e12


def device_peak_tflops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from): the data-sheet table for bf16/fp16 on known GPUs,
    otherwise a measured matmul in the precision's compute dtype."""
    half = precision.startswith(("bf16", "16"))
    if device.type == "cuda" and half:
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16_TFLOPS:
            if key in name:
                return peak, f"{name} dense bf16 data sheet"
    dtype = torch.float32
    if half:  # a CPU with native bf16 runs bf16-mixed too (see auto_precision)
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return measured_matmul_tflops(device, dtype), f"measured {str(dtype).removeprefix('torch.')} matmul on {device.type}"


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """(GiB, what it is): CUDA max allocated since the timed steps began; on CPU the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


def run_bench(cfg: Namespace) -> dict[str, Any]:
    """Time ``cfg.steps`` training steps of the config's model; returns the figures."""
    if cfg.warmup_steps < 0 or cfg.steps <= cfg.warmup_steps:
        raise UserError(f"--steps {cfg.steps} must exceed --warmup_steps {cfg.warmup_steps} (>= 0).")
    accelerator = cfg.trainer.accelerator
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    precision = str(cfg.trainer.precision or auto_precision(accelerator if on_gpu else "cpu"))
    batch_size = int(cfg.data.batch_size)
    model = _instantiate_model(cfg.model).to(device)
    batch = model.example_batch(batch_size, device)

    counter = _FlopCount()  # its own uncompiled step: compiled kernels bypass the counter
    fit_steps(model, batch, batch_size, 1, device, precision, [counter])
    peak_before, peak_source = device_peak_tflops(device, precision)
    timer = StepTimer(cfg.warmup_steps, device)
    callbacks = [SpeedUp(**cfg.speed.as_dict()), _PeakMemoryFrom(cfg.warmup_steps), timer]
    fit_steps(model, batch, batch_size, cfg.steps, device, precision, callbacks)
    peak = max(peak_before, device_peak_tflops(device, precision)[0])  # best of both: a busy host dips

    timed = cfg.steps - cfg.warmup_steps
    step_s = timer.span.wall / timed
    flops_per_img = counter.total / batch_size
    achieved = flops_per_img * batch_size / step_s / 1e12
    memory, memory_kind = peak_memory_gib(device)
    return {
        "method": type(model).__name__,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "batch_size": batch_size,
        "timed_steps": timed,
        "img_per_s": batch_size / step_s,
        "step_time_s": step_s,
        "flops_per_img": flops_per_img,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": achieved / peak,
        "peak_memory_gib": memory,
        "memory_kind": memory_kind,
    }


def _report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"bench {r['method']} on {r['device']} ({r['threads']} threads), {r['precision']}, "
        f"batch {r['batch_size']}, {r['timed_steps']} timed steps",
        f"  img/s          {r['img_per_s']:.1f}",
        f"  step time      {r['step_time_s'] * 1e3:.1f} ms",
        f"  FLOPs / image  {r['flops_per_img'] / 1e9:.2f} GFLOP (forward + backward)",
        f"  achieved       {r['achieved_tflops']:.3f} TFLOP/s",
        f"  peak           {r['peak_tflops']:.3f} TFLOP/s ({r['peak_source']})",
        f"  MFU            {100 * r['mfu']:.1f} %",
        f"  peak memory    {r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})",
    ])


def bench(argv: list[str]) -> dict[str, Any]:
    """Training img/s, FLOPs per image, MFU and peak memory of a config's model on synthetic data.

    Usage: ``python -m ssl_kit bench --config CONFIG [--steps N] [--warmup_steps W] [--output FILE]
    [--model.* / --data.batch_size / --trainer.precision / --speed.* overrides]``.
    """
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the figures readable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = _ParseOnlyCLI(
            SSLMethod, SSLDataModule, subclass_mode_model=True, save_config_callback=None,
            auto_configure_optimizers=False, run=False, args=argv,
        )
    cfg = cli.config
    configs = cfg.get("config") or []
    stem = Path(str(configs[0])).stem if configs else "bench"
    output = writable_file(Path(cfg.output or f"runs/bench/{stem}.json"), "the benchmark results", "pass --output")
    result = run_bench(cfg)
    result["config"] = [str(c) for c in configs]
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(_report(result))
    print(f"wrote {output}")
    return result


bench.parses_own_args = True

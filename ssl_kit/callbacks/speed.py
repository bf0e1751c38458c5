"""Speed and precision options that apply to every method: torch.compile, channels_last,
fused AdamW on CUDA, the automatic precision choice and the fp16 warning."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), where bf16
    matmuls run ~2x faster than fp32. Never assumed: without the instructions bf16 is emulated
    and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def auto_precision(accelerator: object = "auto") -> str:
    """The precision used when a config leaves ``trainer.precision`` unset.

    ``bf16-mixed`` when training will run on a CUDA GPU with bf16 (Ampere or newer) or on a CPU
    with native bf16 (:func:`cpu_has_native_bf16`); else ``32-true`` (an older GPU: fp16 needs loss
    scaling and overflows in MAE-style methods; a CPU without bf16 instructions: emulated bf16 is
    slower than fp32).
    """
    gpu_flags = ("auto", "gpu", "cuda", None)
    on_gpu = (accelerator in gpu_flags if isinstance(accelerator, (str, type(None))) else False)
    if on_gpu and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def fuse_adam(optimizer: Optimizer, device_type: str = "cuda") -> Optimizer:
    """The same Adam/AdamW rebuilt with ``fused=True`` (one kernel per step for all tensors)
    when every parameter is on ``device_type``; any other optimizer, or one already fused, is
    returned as is.

    Rebuilt from its own ``defaults`` and parameter groups, so per-group lr / weight decay stay.
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.defaults.get("fused"):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(p.device.type == device_type and p.is_floating_point() for p in params):
        return optimizer
    accepted = inspect.signature(type(optimizer)).parameters
    skip = ("fused", "foreach")
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k not in skip}
    groups = [{k: v for k, v in group.items() if k not in skip} for group in optimizer.param_groups]
    return type(optimizer)(groups, fused=True, **defaults)


class FusedOnCuda:
    """Wraps an optimizer factory so the optimizer it builds goes through :func:`fuse_adam`."""

    def __init__(self, build: Callable[[Iterable], Optimizer]) -> None:
        self.build = build

    def __call__(self, params: Iterable) -> Optimizer:
        return fuse_adam(self.build(params))


def compile_blocks(method: nn.Module, mode: str | None = None) -> list[str]:
    """``torch.compile`` the method's repeated blocks in place; returns the compiled module names.

    Repeated blocks are the entries of every container named ``blocks`` (timm ViT ``blocks.N``,
    ConvNeXt ``stages.N.blocks.M``, MAE's decoder ``blocks.N``): compiling per block keeps
    compile time short and works under FSDP's per-block wrapping. Without such blocks (e.g. a
    ResNet) the encoder is compiled whole. In place, so state-dict keys stay timm's.
    """
    names = [
        name for name, _ in method.named_modules()
        if len(name.split(".")) >= 2 and name.split(".")[-2] == "blocks" and name.split(".")[-1].isdigit()
    ]
    if not names:
        names = ["encoder"]
    modules = dict(method.named_modules())
    for name in names:
        modules[name].compile(mode=mode)
    return names


def unfuse_attention(module: nn.Module) -> int:
    """Make timm attention layers use explicit matmul + softmax instead of
    ``F.scaled_dot_product_attention``; returns how many layers changed.

    Under bf16 autocast on a CPU, torch's fused (flash) attention backward is ~10x its forward and
    took half of a small ViT's training step; the explicit form runs its matmuls in bf16 and its
    softmax in fp32 (autocast's policy), and made the MAE demo's step 0.55x the fp32 one.
    """
    layers = [m for m in module.modules() if getattr(m, "fused_attn", None) is True]
    for m in layers:
        m.fused_attn = False
    return len(layers)


class SpeedUp(pl.Callback):
    """Speed options for any method, set under ``speed:`` in a config (``--speed.compile true``).

    Args:
        compile: ``torch.compile`` the repeated blocks (see :func:`compile_blocks`) before training.
        compile_mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``).
        channels_last: store 4-D weights channels-last (faster convolutions for ConvNeXt/ResNet
            under mixed precision on tensor cores; cuDNN then runs the convolutions in NHWC).
        fused_adamw: on CUDA, build Adam/AdamW with ``fused=True``.

    Examples:
        >>> trainer = pl.Trainer(callbacks=[SpeedUp(compile=True)])  # doctest: +SKIP
    """

    def __init__(
        self,
        compile: bool = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
        fused_adamw: bool = True,
    ) -> None:
        self.compile, self.compile_mode = compile, compile_mode
        self.channels_last, self.fused_adamw = channels_last, fused_adamw

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Runs before configure_model, the strategy's wrapping and configure_optimizers.
        if stage != "fit":
            return
        if str(trainer.precision).startswith("16") and not getattr(pl_module, "fp16_safe", True):
            rank_zero_warn(
                f"precision={trainer.precision!r} with {type(pl_module).__name__}: pixel-regression "
                "losses overflow in fp16 (NaN losses at scale); use bf16-mixed (Ampere or newer GPUs)."
            )
        on_cuda = trainer.strategy.root_device.type == "cuda"
        if not on_cuda and str(trainer.precision).startswith("bf16"):
            unfuse_attention(pl_module)
        if self.channels_last:
            pl_module.to(memory_format=torch.channels_last)
        if self.compile:
            names = compile_blocks(pl_module, self.compile_mode)
            rank_zero_info(f"torch.compile: {len(names)} modules ({names[0]}, ...)")
        build = getattr(pl_module, "optimizer_fn", None)
        if self.fused_adamw and on_cuda and build is not None and not isinstance(build, FusedOnCuda):
            pl_module.optimizer_fn = FusedOnCuda(build)

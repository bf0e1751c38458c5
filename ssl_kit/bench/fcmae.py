"""FCMAE training-step time: the real step (sparse encoder, mask 0.6) vs the same step with a dense encoder.

    python -m ssl_kit.bench.fcmae [--model_name convnextv2_nano --img_size 224 --batch_size 8 --threads 1]

Every step is FCMAE's own ``training_step`` (mask draw, encoder, decoder, masked MSE), backward and
the AdamW update of its ``configure_optimizers``, run by a Lightning ``Trainer`` on one example
batch (:mod:`ssl_kit.bench.steps`, the path of ``python -m ssl_kit bench``). The modes differ only
in :meth:`~ssl_kit.methods.fcmae.FCMAE.forward_encoder`:

- ``sparse``: FCMAE as trained (:func:`~ssl_kit.backbones.convnextv2_sparse.forward_sparse`);
- ``dense``: timm's ``forward_features`` on the unmasked image, same decoder and loss;
- ``dense_cl``: the same with channels-last input (PyTorch's faster CPU depthwise-conv path);
- ``dense_masked``: the dense emulation of sparse convolution (masking after every layer).

All modes run in one fit, interleaved round by round (``steps_per_round`` steps of each mode per
round) after one untimed warm-up round, and the median step of each is reported, so a busy shared
CPU inflates all of them alike. Prints the figures and the ratio of the sparse step to the faster
dense one (goal <= 0.65). On a CPU shared with other jobs, ``--threads 1`` gives steadier figures.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse import CLI
from torch import Tensor

from ssl_kit.backbones.convnextv2_sparse import forward_dense_masked
from ssl_kit.bench.steps import pick_device, step_precision, timed_steps
from ssl_kit.bench.timer import median
from ssl_kit.methods.fcmae import FCMAE

CL = torch.channels_last
#: The baselines' encoder forwards, each ``(encoder, imgs, mask) -> (B, D, h, w)``.
DENSE = {
    "dense": lambda encoder, imgs, mask: encoder.forward_features(imgs),
    "dense_cl": lambda encoder, imgs, mask: encoder.forward_features(imgs.contiguous(memory_format=CL)),
    "dense_masked": forward_dense_masked,
}
Mode = Literal["sparse", "dense", "dense_cl", "dense_masked"]


class SwitchableFCMAE(FCMAE):
    """FCMAE whose encoder forward is set per step: ``sparse`` is FCMAE's own, the rest are baselines."""

    encoder_mode = "sparse"

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        if self.encoder_mode == "sparse":
            return super().forward_encoder(imgs, mask)
        return DENSE[self.encoder_mode](self.encoder, imgs, mask)  # (B, D, h, w)


class _Schedule(pl.Callback):
    """Sets the model's mode for each step from a list (one entry per step)."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = modes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        pl_module.encoder_mode = self.modes[batch_idx]


def profile_sparse(model: SwitchableFCMAE, batch_size: int, device: torch.device, precision: str,
                   rows: int = 15) -> None:
    """Print the operators that dominate the sparse step (two steps of a new fit, Lightning's own work included)."""
    model.encoder_mode = "sparse"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        timed_steps(model, batch_size, 2, 0, device, precision)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(
    model_name: str = "convnextv2_nano",
    img_size: int = 224,
    batch_size: int = 8,
    mask_ratio: float = 0.6,
    decoder_embed_dim: int = 512,
    rounds: int = 5,
    steps_per_round: int = 2,
    modes: tuple[Mode, ...] = ("sparse", "dense", "dense_cl", "dense_masked"),
    threads: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    profile: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Time FCMAE training steps and print median step times and the sparse/dense ratio.

    Args:
        model_name: timm ConvNeXt V2 name.
        img_size: image side (multiple of 32).
        batch_size: images per step.
        mask_ratio: fraction of 32x32 patches removed.
        decoder_embed_dim: decoder width (paper: 512).
        rounds: interleaved rounds; each mode runs ``steps_per_round`` timed steps per round.
        steps_per_round: timed steps per mode per round.
        modes: which steps to time (``sparse``, ``dense``, ``dense_cl``, ``dense_masked``).
        threads: torch CPU threads (default: torch's choice).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: Lightning precision (default: fp32 on a CPU, bf16-mixed on a GPU that has it).
        profile: also print the top operators of the sparse step.
        seed: seed of weights, images and masks.

    Returns:
        mode -> median seconds per step.
    """
    if threads:
        torch.set_num_threads(threads)
    pl.seed_everything(seed, verbose=False)
    dev = pick_device(device)
    precision = step_precision(dev, precision)
    model = SwitchableFCMAE(model_name, img_size=img_size, mask_ratio=mask_ratio, decoder_embed_dim=decoder_embed_dim)
    warmup = list(modes)  # one untimed step of each mode: allocator, oneDNN kernel selection, AdamW state
    schedule = warmup + [m for _ in range(rounds) for m in modes for _ in range(steps_per_round)]
    timer = timed_steps(model, batch_size, len(schedule) - len(warmup), len(warmup), dev, precision,
                        [_Schedule(schedule)])
    medians = {m: median([t for t, s in zip(timer.steps, schedule[len(warmup):]) if s == m]).wall for m in modes}
    h = img_size // model.patch_size
    kept = int(h * h * (1 - mask_ratio))
    print(f"{model_name} {img_size}px batch {batch_size}, mask {mask_ratio} ({kept}/{h * h} patches kept), "
          f"decoder {decoder_embed_dim}, {precision} on {dev}, {torch.get_num_threads()} threads; "
          f"median of {rounds * steps_per_round} steps")
    for m, t in medians.items():
        print(f"  {m:<13} {t * 1000:8.1f} ms/step  {batch_size / t:7.1f} img/s")
    dense = [m for m in ("dense", "dense_cl") if m in medians]
    if "sparse" in medians and dense:
        best = min(dense, key=medians.get)
        print(f"  sparse / {best} step time: {medians['sparse'] / medians[best]:.2f}x (goal <= 0.65x)")
    if profile:
        profile_sparse(model, batch_size, dev, precision)
    return medians


if __name__ == "__main__":
    CLI(main, as_positional=False)

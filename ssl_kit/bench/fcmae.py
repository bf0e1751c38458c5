"""FCMAE training-step time: sparse encoder at mask 0.6 vs the same model's dense step.

    python -m ssl_kit.bench.fcmae [--model_name convnextv2_nano --img_size 224 --batch_size 8 --threads 1]

Three steps (forward + backward + AdamW update) on one fixed batch and one fixed mask:

- ``sparse``: FCMAE as trained (:func:`~ssl_kit.backbones.convnextv2_sparse.forward_sparse`);
- ``dense``: the encoder is timm's ``forward_features`` on the unmasked image, same decoder and loss;
- ``dense_cl``: the same with channels-last input (PyTorch's faster CPU depthwise-conv path);
- ``dense_masked``: the dense emulation of sparse convolution (masking after every layer).

Modes are interleaved round by round and the median step is reported, so a busy shared CPU
inflates all of them alike. Prints the figures and the ratio of the sparse step to the faster dense
one (goal <= 0.65). On a CPU shared with other jobs, ``--threads 1`` gives steadier figures.
"""

from __future__ import annotations

import statistics
import time

import torch
from jsonargparse import CLI

from ssl_kit.backbones.convnextv2_sparse import forward_dense_masked, forward_sparse
from ssl_kit.losses import masked_mse, pixel_targets
from ssl_kit.masking.hierarchical import random_grid_mask
from ssl_kit.methods.fcmae import FCMAE

CL = torch.channels_last


def encoders(model: FCMAE) -> dict:
    """The three encoder forwards, each ``(imgs, mask) -> (B, D, h, w)``."""
    return {
        "sparse": lambda imgs, mask: forward_sparse(model.encoder, imgs, mask),
        "dense": lambda imgs, mask: model.encoder.forward_features(imgs),
        "dense_cl": lambda imgs, mask: model.encoder.forward_features(imgs.contiguous(memory_format=CL)),
        "dense_masked": lambda imgs, mask: forward_dense_masked(model.encoder, imgs, mask),
    }


def train_step(model: FCMAE, encode, opt: torch.optim.Optimizer, imgs, mask, target) -> float:
    """One optimizer step; returns its wall time in seconds."""
    start = time.perf_counter()
    pred = model.decoder(encode(imgs, mask), mask)  # (B, L, P)
    loss = masked_mse(pred, target, mask.flatten(1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def profile_sparse(model: FCMAE, opt, imgs, mask, target, rows: int = 15) -> None:
    """Print the operators that dominate the sparse step."""
    encode = encoders(model)["sparse"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            train_step(model, encode, opt, imgs, mask, target)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(
    model_name: str = "convnextv2_nano",
    img_size: int = 224,
    batch_size: int = 8,
    mask_ratio: float = 0.6,
    decoder_embed_dim: int = 512,
    rounds: int = 5,
    steps_per_round: int = 2,
    modes: tuple[str, ...] = ("sparse", "dense", "dense_cl", "dense_masked"),
    threads: int | None = None,
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
        profile: also print the top operators of the sparse step.
        seed: seed of weights, images and mask.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = FCMAE(model_name, img_size=img_size, mask_ratio=mask_ratio, decoder_embed_dim=decoder_embed_dim)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    imgs = torch.randn(batch_size, 3, img_size, img_size)
    h = img_size // model.patch_size
    mask = random_grid_mask((h, h), mask_ratio, batch_size)
    target = pixel_targets(imgs, model.patch_size, norm_pix=True)
    forwards = encoders(model)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:  # warm-up: allocator, oneDNN kernel selection
        train_step(model, forwards[m], opt, imgs, mask, target)
    for _ in range(rounds):
        for m in modes:
            times[m] += [train_step(model, forwards[m], opt, imgs, mask, target) for _ in range(steps_per_round)]
    medians = {m: statistics.median(t) for m, t in times.items()}
    kept = int(h * h - mask[0].sum())
    print(f"{model_name} {img_size}px batch {batch_size}, mask {mask_ratio} ({kept}/{h * h} patches kept), "
          f"decoder {decoder_embed_dim}, {torch.get_num_threads()} threads; median of {rounds * steps_per_round} steps")
    for m, t in medians.items():
        print(f"  {m:<13} {t * 1000:8.1f} ms/step  {batch_size / t:7.1f} img/s")
    dense = [m for m in ("dense", "dense_cl") if m in medians]
    if "sparse" in medians and dense:
        best = min(dense, key=medians.get)
        print(f"  sparse / {best} step time: {medians['sparse'] / medians[best]:.2f}x (goal <= 0.65x)")
    if profile:
        profile_sparse(model, opt, imgs, mask, target)
    return medians


if __name__ == "__main__":
    CLI(main, as_positional=False)

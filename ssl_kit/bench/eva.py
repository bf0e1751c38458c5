"""EVA training-step time, split into the teacher's forward and the student's forward/backward.

    python -m ssl_kit.bench.eva [--student vit_base_patch16_224 --teacher ViT-L-14 --batch_size 4]

Each step: block mask -> frozen teacher forward (inference mode; bf16 autocast on CUDA) ->
student forward with mask tokens + linear head + negative cosine -> backward -> AdamW update.
The teacher has random weights (only time is measured; nothing is downloaded). Prints the median
of each part over the timed steps, the teacher's share of the step and images per second. On a
shared CPU every figure is inflated by the other processes; compare shares, not absolutes.
"""

from __future__ import annotations

import statistics
import time

import torch
from jsonargparse import CLI

from ssl_kit.backbones.teacher import TeacherConfig
from ssl_kit.losses import masked_negative_cosine
from ssl_kit.methods.eva import EVA


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(model: EVA, opt: torch.optim.Optimizer, imgs: torch.Tensor) -> tuple[float, float]:
    """One training step; returns (teacher forward seconds, student forward/backward/update seconds)."""
    device = imgs.device
    sync(device)
    start = time.perf_counter()
    mask = model.draw_mask(imgs.shape[0], device)
    target = model.teacher(imgs, model.grid)  # (B, L, D_teacher)
    sync(device)
    mid = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        pred = model.head(model.forward_student(imgs, mask)[:, model.encoder.num_prefix_tokens:])  # (B, L, D_teacher)
    loss = masked_negative_cosine(pred, target, mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)
    return mid - start, time.perf_counter() - mid


def main(
    student: str = "vit_base_patch16_224",
    teacher: str = "ViT-L-14",
    img_size: int = 224,
    patch_size: int | None = None,
    batch_size: int = 4,
    steps: int = 3,
    warmup_steps: int = 1,
    device: str = "auto",
    seed: int = 0,
) -> dict[str, float]:
    """Time EVA training steps and print the teacher / student split.

    Args:
        student: timm ViT name of the student.
        teacher: open_clip model name (or model-config JSON) of the teacher (random weights).
        img_size: student resolution; the teacher runs at its own native resolution.
        patch_size: overrides the student's patch size.
        batch_size: images per step.
        steps: timed steps (median reported).
        warmup_steps: untimed steps first (allocator, autotuning).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        seed: RNG seed.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = EVA(student, img_size=img_size, patch_size=patch_size,
                teacher=TeacherConfig("open_clip", teacher, random_init=True)).to(dev)
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-4)
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    for _ in range(warmup_steps):
        timed_step(model, opt, imgs)
    times = [timed_step(model, opt, imgs) for _ in range(steps)]
    t_teacher = statistics.median(t for t, _ in times)
    t_student = statistics.median(s for _, s in times)
    total = t_teacher + t_student
    threads = torch.get_num_threads() if dev.type == "cpu" else None
    print(f"EVA step on {dev}{f' ({threads} threads)' if threads else ''}: student {student} @ {img_size} px "
          f"(grid {model.grid[0]}x{model.grid[1]}), teacher open_clip {teacher} @ {model.teacher.input_size[0]} px "
          f"(grid {model.teacher.grid[0]}x{model.teacher.grid[1]}, width {model.teacher.out_dim}), batch {batch_size}, "
          f"median of {steps} steps")
    print(f"  teacher forward            {t_teacher * 1e3:9.1f} ms  ({100 * t_teacher / total:4.1f}% of the step)")
    print(f"  student fwd + bwd + update {t_student * 1e3:9.1f} ms  ({100 * t_student / total:4.1f}%)")
    print(f"  step                       {total * 1e3:9.1f} ms  = {batch_size / total:.2f} img/s")
    return {"teacher_s": t_teacher, "student_s": t_student, "img_per_s": batch_size / total}


if __name__ == "__main__":
    CLI(main, as_positional=False)

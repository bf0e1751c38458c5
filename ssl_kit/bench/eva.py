"""EVA training-step time, and the teacher's share of it.

    python -m ssl_kit.bench.eva [--student vit_base_patch16_224 --teacher ViT-L-14 --batch_size 4]

The step is EVA's own ``training_step`` (block mask -> frozen teacher forward, inference mode and
bf16 autocast on CUDA -> student forward with mask tokens + linear head + negative cosine),
backward and the AdamW update of its ``configure_optimizers``, run by a Lightning ``Trainer`` on
one example batch (:mod:`ssl_kit.bench.steps`, the path of ``python -m ssl_kit bench``) and timed
whole. After each step the teacher's forward on the same images is timed alone, interleaved with
the steps; the rest of the step (mask, student forward, backward, update) is the difference of
the two medians. The teacher has random weights (only time is measured; nothing is downloaded).
On a shared CPU every figure is inflated by the other processes; compare shares, not absolutes.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from jsonargparse import CLI

from ssl_kit.backbones.teacher import TeacherConfig
from ssl_kit.bench.steps import pick_device, step_precision, timed_steps
from ssl_kit.bench.timer import Seconds, Span, median
from ssl_kit.methods.eva import EVA


class TeacherTimer(pl.Callback):
    """After each training step, the teacher's forward alone on the step's images; timed from step
    ``warmup`` on (earlier ones warm it up too)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[Seconds] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        (imgs,), _ = batch  # one view
        with Span(imgs.device) as span:
            pl_module.teacher.targets(imgs, pl_module.grid)  # (B, L, D_teacher), (B, D_pool)
        if batch_idx >= self.warmup:
            self.times.append(span.seconds)


def main(
    student: str = "vit_base_patch16_224",
    teacher: str = "ViT-L-14",
    img_size: int = 224,
    patch_size: int | None = None,
    batch_size: int = 4,
    steps: int = 3,
    warmup_steps: int = 1,
    device: str = "auto",
    precision: str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Time EVA training steps and print the teacher / rest split.

    Args:
        student: timm ViT name of the student.
        teacher: open_clip model name (or model-config JSON) of the teacher (random weights).
        img_size: student resolution; the teacher runs at its own native resolution.
        patch_size: overrides the student's patch size.
        batch_size: images per step.
        steps: timed steps (median reported).
        warmup_steps: untimed steps first (allocator, autotuning).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: Lightning precision of the step (default: fp32 on a CPU, bf16-mixed on a GPU
            that has it); the teacher runs in bf16 on CUDA either way.
        seed: RNG seed.

    Returns:
        ``teacher_s``, ``student_s`` (the rest of the step), ``step_s`` (median seconds) and ``img_per_s``.
    """
    pl.seed_everything(seed, verbose=False)
    dev = pick_device(device)
    precision = step_precision(dev, precision)
    model = EVA(student, img_size=img_size, patch_size=patch_size,
                teacher=TeacherConfig("open_clip", teacher, random_init=True))
    teacher_timer = TeacherTimer(warmup_steps)
    step_timer = timed_steps(model, batch_size, steps, warmup_steps, dev, precision, [teacher_timer])
    t_step, t_teacher = median(step_timer.steps).wall, median(teacher_timer.times).wall
    t_rest = t_step - t_teacher
    threads = torch.get_num_threads() if dev.type == "cpu" else None
    print(f"EVA step on {dev}{f' ({threads} threads)' if threads else ''}, {precision}: student {student} @ "
          f"{img_size} px (grid {model.grid[0]}x{model.grid[1]}), teacher open_clip {teacher} @ "
          f"{model.teacher.input_size[0]} px (grid {model.teacher.grid[0]}x{model.teacher.grid[1]}, width "
          f"{model.teacher.out_dim}), batch {batch_size}, median of {steps} steps")
    parts = (("teacher forward (timed alone)", t_teacher), ("rest: mask, student fwd + bwd + update", t_rest))
    for label, seconds in parts:
        print(f"  {label:<41}{seconds * 1e3:9.1f} ms  ({100 * seconds / t_step:4.1f}% of the step)")
    print(f"  {'step: training_step + backward + update':<41}{t_step * 1e3:9.1f} ms  = {batch_size / t_step:.2f} img/s")
    return {"teacher_s": t_teacher, "student_s": t_rest, "step_s": t_step, "img_per_s": batch_size / t_step}


if __name__ == "__main__":
    CLI(main, as_positional=False)

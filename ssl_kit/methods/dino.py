"""DINO: self-distillation with no labels (Caron et al., 2021, arXiv:2104.14294)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ssl_kit.errors import UserError
from ssl_kit.heads.dino import DINOHead
from ssl_kit.losses.dino import dino_loss, update_center
from ssl_kit.methods.base import OptimizerCallable, SSLMethod
from ssl_kit.methods.ema import EMATarget
from ssl_kit.methods.multiview import by_resolution, multicrop_encoder
from ssl_kit.views.multicrop import BYOL_VIEWS, MultiCropTransform, Photometric

#: Global crops: BYOL's two view settings (blur 1.0; blur 0.1 + solarize 0.2). Local crops: blur 0.5.
LOCAL_VIEW = Photometric(blur_p=0.5, solarize_p=0.0)
N_GLOBAL = 2


def adamw(params) -> torch.optim.Optimizer:
    """DINO's AdamW: base lr 5e-4 per 256 images, weight decay 0.04 at the start (see ``weight_decay_end``)."""
    return torch.optim.AdamW(params, lr=5e-4, weight_decay=0.04)


class DINO(SSLMethod):
    """A student (timm backbone + :class:`~ssl_kit.heads.dino.DINOHead`) trained to match an EMA
    teacher of itself: the teacher sees the 2 global crops, the student every crop; the loss is
    the cross-entropy between the centred, sharpened teacher distribution and the student's over
    every pair of different views (:func:`~ssl_kit.losses.dino.dino_loss`).

    ``encoder`` (what ``extract_features``, ``export`` and the evaluators use) is the *teacher*
    backbone, as in the paper, whose k-NN and linear results are the teacher's; the student
    backbone is ``student``. The centre is a buffer (saved in checkpoints) updated from the global
    batch. Weight decay follows a cosine from the optimizer's value to ``weight_decay_end``; the
    head's last layer gets no update during the first ``freeze_last_layer`` epochs.

    Args:
        model_name: any timm model (``vit_small_patch16_224`` with ``dynamic_img_size``, ``resnet50``...).
        encoder_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ``img_size``...).
        img_size: global-crop side (also the evaluation size).
        local_size: local-crop side (<= ``img_size``).
        local_crops_number: local crops per image (paper: 10; 6 in later releases).
        global_crops_scale: RandomResizedCrop area range of the global crops.
        local_crops_scale: RandomResizedCrop area range of the local crops.
        out_dim: prototypes K.
        hidden_dim: head MLP hidden width.
        bottleneck_dim: head bottleneck width.
        head_batch_norm: BatchNorm in the head's hidden layers (the reference's ``use_bn_in_head``).
        student_temp: tau_s.
        teacher_temp: tau_t after the warm-up.
        warmup_teacher_temp: tau_t in the first epoch (linear to ``teacher_temp``).
        warmup_teacher_temp_epochs: epochs of the tau_t warm-up.
        center_momentum: momentum m of the centre EMA.
        base_momentum: teacher EMA momentum at the first step.
        final_momentum: teacher EMA momentum at the last step (cosine in optimizer steps).
        weight_decay_end: weight decay at the last step, cosine from the optimizer's (None: constant).
        clip_grad: per-parameter gradient-norm clipping, as the reference (0: off).
        freeze_last_layer: epochs during which the head's last layer is not updated.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> model = DINO("resnet18", img_size=32, local_size=16, local_crops_number=2, out_dim=64,
        ...              hidden_dim=64, bottleneck_dim=32)
        >>> views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
        >>> loss = model(views)
    """

    fp16_safe = True  # softmax cross-entropy of normalised prototype scores, computed in fp32

    def __init__(
        self,
        model_name: str = "vit_small_patch16_224",
        encoder_kwargs: dict[str, Any] | None = None,
        img_size: int = 224,
        local_size: int = 96,
        local_crops_number: int = 10,
        global_crops_scale: tuple[float, float] = (0.4, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.4),
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_batch_norm: bool = False,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        weight_decay_end: float | None = 0.4,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        optimizer: OptimizerCallable = adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        _check_args(self.hparams)
        self.img_size = img_size
        self.student = self.build_encoder()
        self.head = DINOHead(self.student.num_features, out_dim, hidden_dim, bottleneck_dim, 3, head_batch_norm)
        self.teacher = EMATarget(nn.Sequential(self.student, self.head), base_momentum, final_momentum)
        # The evaluated and exported encoder is the teacher's backbone (registered twice: same tensors).
        self.encoder = self.teacher.module[0]
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._weight_decay: float | None = None  # this step's scheduled weight decay, for the log

    # --- encoder and views ----------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        hp = self.hparams
        encoder, self.encoder_spec = multicrop_encoder(hp.model_name, hp.encoder_kwargs, hp.local_crops_number, hp.local_size,
                                                       "local_crops_number")
        return encoder

    def train_transform(self) -> Callable:
        hp = self.hparams
        views = [*BYOL_VIEWS[:N_GLOBAL], *[LOCAL_VIEW] * hp.local_crops_number]  # one setting per view
        return MultiCropTransform(N_GLOBAL, hp.local_crops_number, hp.img_size, hp.local_size,
                                  hp.global_crops_scale, hp.local_crops_scale, views=views)

    # --- forward and loss -----------------------------------------------------------------
    def forward(self, views: list[Tensor]) -> Tensor:
        """Student outputs of every view, teacher outputs of the global views, the loss; then the
        centre moves toward this (global) batch's teacher mean.

        Shapes:
            views: 2 x (B, C, H, W) then n_local x (B, C, h, w) -> scalar.
        """
        hp = self.hparams
        if len(views) != N_GLOBAL + hp.local_crops_number:
            raise ValueError(f"expected {N_GLOBAL} global + {hp.local_crops_number} local views, got {len(views)}.")
        student = by_resolution(lambda x: self.head(self.student(x)), views)
        with torch.no_grad():
            teacher = by_resolution(self.teacher, views[:N_GLOBAL])  # local crops never reach the teacher
        loss = dino_loss(student, teacher, self.center, hp.student_temp, self.teacher_temp())
        update_center(self.center, teacher, hp.center_momentum)  # after the loss, as the reference
        return loss

    def training_step(self, batch, batch_idx: int) -> Tensor:
        views, _ = batch
        loss = self(list(views))
        # optimizer_step scheduled this step's weight decay before running this closure.
        scheduled = {"weight_decay": self._weight_decay} if self._weight_decay is not None else {}
        self.log_step(loss, batch_size=views[0].shape[0], teacher_temp=self.teacher_temp(),
                      ema_momentum=self.teacher.momentum, **scheduled)
        return loss

    # --- schedules --------------------------------------------------------------------------
    def teacher_temp(self) -> float:
        """tau_t of the current epoch: linear from ``warmup_teacher_temp`` (epoch 0) to
        ``teacher_temp`` (epoch ``warmup_teacher_temp_epochs - 1``), then constant."""
        hp = self.hparams
        epoch, n = self.current_epoch, hp.warmup_teacher_temp_epochs  # current_epoch is 0 without a trainer
        if epoch >= n:
            return hp.teacher_temp
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * epoch / max(1, n - 1)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        for group in config["optimizer"].param_groups:  # the schedule's start, kept in the optimizer state
            group["initial_weight_decay"] = group["weight_decay"]
        return config

    def optimizer_step(self, *args, **kwargs) -> None:
        self._schedule_weight_decay(self.trainer.global_step)
        super().optimizer_step(*args, **kwargs)
        # The teacher follows every real optimizer step, inside the step itself, so any checkpoint
        # holds a consistent (student, teacher) pair.
        done = self.trainer.global_step + 1  # Lightning counts this step as completed after the hook
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.teacher.update(nn.Sequential(self.student, self.head), done, total)

    def _schedule_weight_decay(self, step: int) -> None:
        end = self.hparams.weight_decay_end
        if end is None:
            return
        total = max(1, int(self.trainer.estimated_stepping_batches))
        for group in self.optimizers().optimizer.param_groups:
            start = group.get("initial_weight_decay", group["weight_decay"])
            if start > 0:  # the no-decay group (biases, norms) stays at 0
                group["weight_decay"] = end + (start - end) * (1 + math.cos(math.pi * step / total)) / 2
                self._weight_decay = group["weight_decay"]

    def on_before_optimizer_step(self, optimizer) -> None:
        # The reference clips each parameter's gradient norm separately, then cancels the last
        # layer's gradient in the first epoch(s): with no gradient AdamW skips it (no decay either).
        if self.hparams.clip_grad > 0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_((self.hparams.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if self.current_epoch < self.hparams.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None


def _check_args(hp) -> None:
    if hp.local_crops_number < 0:
        raise UserError(f"local_crops_number={hp.local_crops_number} is not allowed: use >= 0.")
    if hp.local_crops_number > 0 and hp.local_size > hp.img_size:
        raise UserError(f"local_size={hp.local_size} is larger than img_size={hp.img_size}: use local_size <= img_size.")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        if hp[name] <= 0:
            raise UserError(f"{name}={hp[name]} is not allowed: temperatures must be > 0.")
    if not 0.0 <= hp.center_momentum < 1.0:
        raise UserError(f"center_momentum={hp.center_momentum} is not allowed: use 0 <= center_momentum < 1.")
    if hp.out_dim < 1 or hp.bottleneck_dim < 1 or hp.hidden_dim < 1:
        raise UserError(f"out_dim={hp.out_dim}, hidden_dim={hp.hidden_dim}, bottleneck_dim={hp.bottleneck_dim}: "
                        "head widths must be >= 1.")
    if hp.freeze_last_layer < 0 or hp.warmup_teacher_temp_epochs < 0 or hp.clip_grad < 0:
        raise UserError(f"freeze_last_layer={hp.freeze_last_layer}, warmup_teacher_temp_epochs="
                        f"{hp.warmup_teacher_temp_epochs}, clip_grad={hp.clip_grad}: each must be >= 0.")

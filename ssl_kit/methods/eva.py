"""EVA: Exploring the Limits of Masked Visual Representation Learning at Scale (Fang et al., 2023, arXiv:2211.07636)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from ssl_kit.backbones.teacher import FrozenTeacher, TeacherConfig
from ssl_kit.backbones.vit import create_vit, forward_mask_token
from ssl_kit.checkpoints.frozen import restore_frozen, strip_frozen
from ssl_kit.errors import UserError
from ssl_kit.losses import masked_negative_cosine
from ssl_kit.masking.block import block_masking, check_block_masking
from ssl_kit.methods.base import OptimizerCallable, SSLMethod, adamw
from ssl_kit.views import MaskedImageTransform, Views

TEACHER_PREFIX = "teacher."


class EVA(SSLMethod):
    """Masked feature distillation: a timm ViT student sees the whole image with a learned mask
    token in place of ~40% of its patch embeddings (BEiT block-wise masking); a linear head maps
    its outputs to the frozen teacher's width; the loss is the negative cosine to the teacher's
    patch features at the masked positions.

    The teacher (an open_clip CLIP tower or any ssl_kit-loadable encoder, see
    :class:`TeacherConfig`) is never trained, never in the optimizer and never saved: checkpoints
    hold the student only and refer to the teacher by its config (file path); loading a
    checkpoint rebuilds the teacher from that path.

    Args:
        model_name: timm ViT name of the student (``vit_base_patch16_224``, ...).
        img_size: input resolution (divisible by the patch size).
        patch_size: overrides the name's patch size.
        encoder_kwargs: more ``timm.create_model`` arguments for the student (e.g. ``embed_dim``,
            ``depth``, ``num_heads`` for a ViT smaller than the name's).
        teacher: the frozen teacher; see :class:`TeacherConfig`.
        mask_ratio: target fraction of masked patches (paper: 0.4).
        min_num_patches: smallest mask block, in patches (BEiT: 16).
        min_aspect: mask blocks have aspect ratios in ``[min_aspect, 1 / min_aspect]`` (BEiT: 0.3).
        pooled_weight: weight of an extra target, not in the paper (0: off): the student's pooled
            feature (what evaluators read from it, per ``global_pool``: the mean patch token or the
            class token), through its own linear head, regresses the teacher's pooled feature with
            the same negative cosine. The paper's loss trains masked positions only, so the pooled
            feature of an unmasked image is never fitted to the teacher's; this fits it directly.
        pooled_projection: the pooled target goes through a linear head (True) or the student's
            pooled feature itself regresses the teacher's (False; the widths must match). Without
            the head the student's features share the teacher's cosine geometry, which k-NN reads;
            a head leaves them equal to the teacher's only up to a linear map, which a linear
            probe undoes and k-NN does not.
        drop_path_rate: student stochastic depth.
        global_pool: the student's feature for evaluators: ``avg`` (mean of the final-norm patch
            tokens, which the loss trains; BEiT/EVA fine-tune this way) or ``token`` (the class token,
            which gets no training signal here).
        crop_scale: RandomResizedCrop area range.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> eva = EVA("vit_tiny_patch16_224", img_size=32, patch_size=4, min_num_patches=4,
        ...           teacher=TeacherConfig("encoder", "vit_tiny_patch16_224", random_init=True))
        >>> loss, mask = eva(torch.randn(2, 3, 32, 32))
    """

    fp16_safe = True  # the negative cosine is computed in fp32 on normalised features

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        teacher: TeacherConfig = TeacherConfig(),
        mask_ratio: float = 0.4,
        min_num_patches: int = 16,
        min_aspect: float = 0.3,
        pooled_weight: float = 0.0,
        pooled_projection: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: Literal["avg", "token"] = "avg",
        crop_scale: tuple[float, float] = (0.2, 1.0),
        optimizer: OptimizerCallable = adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 40.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        if isinstance(teacher, dict):  # as stored in a checkpoint's hyper-parameters
            teacher = TeacherConfig(**teacher)
        self.save_hyperparameters(ignore=["optimizer", "teacher"])
        self.hparams["teacher"] = dataclasses.asdict(teacher)  # plain types: loads with weights_only=True
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale)
        self.encoder = self.build_encoder()
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        # Bad masking arguments fail before the (possibly large) teacher loads.
        check_block_masking(self.grid, mask_ratio, min_num_patches, min_aspect)
        self.teacher = FrozenTeacher(teacher)
        # Lightning warns about modules in eval mode at fit start: here they are the frozen teacher, on purpose.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        self.teacher.check_grid(self.grid)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(self.encoder.embed_dim, self.teacher.out_dim)
        if pooled_weight < 0:
            raise UserError(f"pooled_weight={pooled_weight} is not allowed: use 0 (off) or a positive weight.")
        self.pooled_head = None
        if pooled_weight > 0 and pooled_projection:
            self.pooled_head = nn.Linear(self.encoder.embed_dim, self.teacher.pooled_dim)
        elif pooled_weight > 0:
            if self.encoder.embed_dim != self.teacher.pooled_dim:
                raise UserError(f"pooled_projection=false needs the student's width ({self.encoder.embed_dim}) to "
                                f"equal the teacher's pooled width ({self.teacher.pooled_dim}): use "
                                "pooled_projection: true, or a student of that width.")
            self.pooled_head = nn.Identity()

    def build_encoder(self) -> nn.Module:
        hp = self.hparams
        kwargs = dict(hp.encoder_kwargs or {}, img_size=hp.img_size, drop_path_rate=hp.drop_path_rate,
                      global_pool=hp.global_pool)
        if hp.global_pool == "avg":
            kwargs["fc_norm"] = False  # keep timm's final norm on the tokens (what the loss sees), pool after it
        if hp.patch_size is not None:
            kwargs["patch_size"] = hp.patch_size
        self.encoder_spec = (hp.model_name, kwargs)
        return create_vit(hp.model_name, **kwargs)

    def train_transform(self) -> Callable:
        return Views(MaskedImageTransform(self.img_size, scale=self.crop_scale))

    def draw_mask(self, batch_size: int, device: torch.device) -> Tensor:
        """A fresh block-wise mask per sample, drawn on the CPU (tiny) and moved to ``device``.

        Shapes:
            returns (B, L), 1 = masked.
        """
        hp = self.hparams
        mask = self.draw_global(  # on the CPU: the step generator lives where the draw runs
            lambda n, g: block_masking(self.grid, hp.mask_ratio, n, hp.min_num_patches, hp.min_aspect, generator=g),
            batch_size, "cpu")
        return mask.to(device, non_blocking=True)

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mask, run the student and the teacher, and score the masked positions (plus the
        pooled target when ``pooled_weight > 0``).

        Shapes:
            imgs: (B, C, H, W); mask: optional (B, L) -> loss (), mask (B, L) with 1 = masked.
        """
        if mask is None:
            mask = self.draw_mask(imgs.shape[0], imgs.device)
        target, pooled_target = self.teacher.targets(imgs, self.grid)  # (B, L, D_t), (B, D_pool); no graph
        tokens = forward_mask_token(self.encoder, imgs, mask, self.mask_token)  # (B, n_prefix + L, D)
        pred = self.head(tokens[:, self.encoder.num_prefix_tokens:])  # (B, L, D_t)
        loss = masked_negative_cosine(pred, target, mask)
        if self.pooled_head is not None:
            n_prefix = self.encoder.num_prefix_tokens
            pooled = tokens[:, n_prefix:].mean(1, keepdim=True) if self.hparams.global_pool == "avg" else tokens[:, :1]
            pooled = self.pooled_head(pooled)  # (B, 1, D_pool)
            every = torch.ones(pooled.shape[:2], device=pooled.device)
            loss = loss + self.hparams.pooled_weight * masked_negative_cosine(pooled, pooled_target[:, None], every)
        return loss, mask

    def training_step(self, batch, batch_idx: int) -> Tensor:
        (imgs,), _ = batch  # one view
        loss, mask = self(imgs)
        self.log_step(loss, batch_size=imgs.shape[0], mask_ratio=mask.mean())
        return loss

    # --- the teacher stays out of checkpoints -----------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        strip_frozen(checkpoint["state_dict"], [TEACHER_PREFIX])
        checkpoint["ssl_kit"]["teacher"] = {**self.hparams["teacher"], "file_bytes": self._teacher_file_bytes()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # The teacher was rebuilt from its file in __init__; give load_state_dict its weights back.
        restore_frozen(checkpoint["state_dict"], self, [TEACHER_PREFIX])
        saved = checkpoint.get("ssl_kit", {}).get("teacher", {}).get("file_bytes")
        if saved is not None and saved != self._teacher_file_bytes():
            warnings.warn(f"the teacher file {self.hparams['teacher']['checkpoint']!r} changed size since this "
                          f"checkpoint was written ({saved} bytes then): the targets may differ.", stacklevel=2)

    def _teacher_file_bytes(self) -> int | None:
        source = self.hparams["teacher"]["checkpoint"]
        return Path(source).stat().st_size if source and Path(source).is_file() else None

"""Frozen feature teachers for distillation (EVA, Fang et al. 2023, arXiv:2211.07636).

A teacher is an open_clip vision tower chosen by model name, or any encoder
``ssl_kit.checkpoints.load_encoder`` accepts, with weights from a LOCAL file only. It maps
the student's (ImageNet-normalised) images to one target vector per student patch.

Grid matching: the teacher always runs at its own native resolution and its final token grid is
average-pooled onto the student's grid (``adaptive_avg_pool2d``). For ViT-L/14 at 224 px
(16x16 tokens) and a ViT-B/16 student (14x14), each target is the mean of the teacher tokens that
cover the same image region as the student patch. We pool features rather than resize the
teacher's input to 196 px because the teacher then sees exactly the resolution and position
embeddings it was trained with (no position-embedding resampling, no resolution shift in the
targets), and the same rule works for every tower (open_clip, timm ViT, CNN). The price is ~30%
more teacher tokens (256 instead of 196). A teacher grid coarser than the student's is refused:
its targets would be interpolated, not measured.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_kit.backbones.convnextv2_sparse import fast_grn_
from ssl_kit.checkpoints import load_encoder, load_strict, read_state_dict
from ssl_kit.errors import MissingFileError, UserError
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TeacherConfig:
    """Where the frozen teacher comes from and how its targets are made.

    Args:
        kind: ``open_clip``: a CLIP vision tower by open_clip model name; ``encoder``: any encoder
            ``load_encoder`` accepts (ssl_kit checkpoint, exported ``.safetensors``, official MAE /
            ConvNeXt V2 checkpoint).
        model_name: ``open_clip``: a built-in model name (``ViT-L-14``, ``ViT-B-16``,
            ``EVA02-L-14``, ...) or the path of an open_clip model-config JSON. ``encoder``: the timm
            architecture, needed only when the file does not name it.
        checkpoint: local weights file (never downloaded). open_clip: a state dict of the whole
            CLIP model (``visual.*`` keys) or of the vision tower, ``.bin``/``.pt``/``.safetensors``.
        random_init: start from random weights when ``checkpoint`` is unset. Smoke tests only.
        normalize_targets: standardise each target vector (LayerNorm without affine). Plain L2
            normalisation would change nothing under a cosine loss.
        project: open_clip only: map the patch tokens through the tower's image-text projection
            (EVA-01 regresses these "image-text aligned" features) instead of the final-norm tokens.
        mean: the teacher's input normalisation mean; default: OpenAI CLIP's for open_clip
            (set it for SigLIP-style towers), ImageNet's (ssl_kit's) for encoders.
        std: as ``mean``.

    Examples:
        >>> cfg = TeacherConfig("open_clip", "ViT-L-14", checkpoint="/models/clip-vit-l-14.bin")
    """

    kind: Literal["open_clip", "encoder"] = "open_clip"
    model_name: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    normalize_targets: bool = False
    project: bool = False
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        # jsonargparse 4.5x turns `--model.teacher.checkpoint null` into the string 'None' for a
        # dataclass nested in a subclass-mode argument; read it as the null the user typed.
        for name in ("model_name", "checkpoint"):
            if getattr(self, name) in ("None", "null", ""):
                setattr(self, name, None)


def check_teacher_source(cfg: TeacherConfig) -> None:
    """Refuse to start without teacher weights, naming the file looked for."""
    if cfg.kind not in ("open_clip", "encoder"):
        raise UserError(f"teacher.kind={cfg.kind!r} is not allowed: use 'open_clip' or 'encoder'.")
    if cfg.checkpoint is not None and cfg.random_init:
        raise UserError(f"teacher.checkpoint={cfg.checkpoint!r} and teacher.random_init=true contradict "
                         "each other: unset one of them.")
    if cfg.checkpoint is None and not cfg.random_init:
        raise UserError("no teacher weights: set teacher.checkpoint to a local weights file (nothing is "
                         "downloaded); teacher.random_init=true gives a random teacher, for smoke tests only.")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        hint = ""
        if "runs/demo/mae" in Path(cfg.checkpoint).as_posix():
            hint = (" The EVA demo distils the MAE demo's encoder: run "
                    "`python -m ssl_kit fit --config configs/demo/mae.yaml` first.")
        raise MissingFileError(f"teacher weights not found: teacher.checkpoint={cfg.checkpoint!r} is not a "
                                f"file (looked for {Path(cfg.checkpoint).resolve()}).{hint}")


# --- open_clip towers -----------------------------------------------------------------------
def open_clip_name(model_name: str | None) -> str:
    """Resolve and check an open_clip model name; a ``.json`` path is registered as a custom config."""
    import open_clip

    if not model_name:
        raise UserError("teacher.model_name is required for teacher.kind='open_clip' (e.g. 'ViT-L-14').")
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise MissingFileError(f"teacher.model_name={model_name!r}: no such open_clip model-config file.")
        open_clip.add_model_config(path)
        model_name = path.stem
    if ":" in model_name:
        raise UserError(f"teacher.model_name={model_name!r}: schema names (hf-hub:, local-dir:) are not "
                         "allowed; give a built-in open_clip name and teacher.checkpoint (a local file).")
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known, n=8, cutoff=0.5)
        raise UserError(f"unknown open_clip model name teacher.model_name={model_name!r}. Close names: "
                         f"{', '.join(close) or 'none'}. All names: open_clip.list_models().")
    return model_name


def load_tower_weights(tower: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a vision-tower state dict (of the tower, or of a whole CLIP: ``visual.*``) strictly;
    any mismatch is one error listing the offending keys."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    load_strict(tower, state, f"teacher weights {source}")


def open_clip_tower(cfg: TeacherConfig) -> nn.Module:
    """The vision tower of an open_clip model, with weights from ``cfg.checkpoint`` unless random."""
    import open_clip

    name = open_clip_name(cfg.model_name)
    logging.disable(logging.WARNING)  # silence "no pretrained weights loaded": we load them ourselves below
    try:
        tower = open_clip.create_model(name, pretrained=None, device="cpu").visual  # the text tower is dropped
    finally:
        logging.disable(logging.NOTSET)
    if cfg.checkpoint is not None:
        state = read_state_dict(cfg.checkpoint, f"teacher.checkpoint={cfg.checkpoint!r}")
        load_tower_weights(tower, state, f"{cfg.checkpoint!r} (open_clip {name})")
    return tower


def encoder_tower(cfg: TeacherConfig) -> nn.Module:
    """A timm encoder from ``load_encoder`` (or a random one of ``cfg.model_name`` for smoke tests)."""
    if cfg.checkpoint is None:
        import timm

        if not cfg.model_name or not timm.is_model(cfg.model_name):
            raise UserError(f"teacher.model_name={cfg.model_name!r} is not a timm model name; a random "
                             "encoder teacher needs one.")
        return timm.create_model(cfg.model_name, pretrained=False, num_classes=0)
    return fast_grn_(load_encoder(cfg.checkpoint, model_name=cfg.model_name))


# --- the frozen module ----------------------------------------------------------------------
def native_input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) resolution a tower was built for (open_clip ``image_size``, timm ``patch_embed``/cfg)."""
    size = getattr(model, "image_size", None)
    if size is None and hasattr(model, "patch_embed"):
        size = model.patch_embed.img_size
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-2:]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class FrozenTeacher(nn.Module):
    """A frozen tower that maps student images to one target vector per student patch.

    Always in eval mode (``train()`` cannot switch it back), ``requires_grad=False``, run under
    ``torch.inference_mode`` and, on CUDA, bf16 autocast. Inputs are re-normalised from ImageNet
    statistics (ssl_kit's views) to the teacher's and resized to its native resolution; its final
    token grid is average-pooled onto the student's grid (see the module docstring for why).

    Args:
        cfg: where the teacher comes from; see :class:`TeacherConfig`.

    Examples:
        >>> teacher = FrozenTeacher(TeacherConfig("open_clip", "ViT-B-16", random_init=True))
        >>> teacher.check_grid((14, 14))
        >>> targets = teacher(torch.randn(2, 3, 224, 224), grid=(14, 14))  # (2, 196, 768)
    """

    def __init__(self, cfg: TeacherConfig) -> None:
        super().__init__()
        check_teacher_source(cfg)
        self.cfg = cfg
        self.model = open_clip_tower(cfg) if cfg.kind == "open_clip" else encoder_tower(cfg)
        self.model.eval().requires_grad_(False)
        clip = cfg.kind == "open_clip"
        mean = torch.tensor(cfg.mean or (OPENAI_CLIP_MEAN if clip else IMAGENET_MEAN))
        std = torch.tensor(cfg.std or (OPENAI_CLIP_STD if clip else IMAGENET_STD))
        # x_teacher = (x * in_std + in_mean - mean) / std, folded into one scale and shift per channel.
        scale = torch.tensor(IMAGENET_STD) / std
        shift = (torch.tensor(IMAGENET_MEAN) - mean) / std
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.input_size = native_input_size(self.model)
        with torch.inference_mode():
            probe, pooled = self.tokens(torch.zeros(1, 3, *self.input_size))  # (1, D, h, w), (1, D_pool)
        self.out_dim, self.grid, self.pooled_dim = probe.shape[1], tuple(probe.shape[-2:]), pooled.shape[-1]
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # Lightning calls model.train() on the whole module each epoch

    def tokens(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The tower's final patch tokens (after its final norm) as a grid, and its pooled output
        (what an evaluator reads from it: open_clip's image embedding, timm's pre-logits feature).

        Shapes:
            x: (B, C, H, W) at the teacher's resolution and normalisation -> (B, D, h, w), (B, D_pool)
        """
        if self.cfg.kind == "open_clip":
            out = self.model.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                                   intermediates_only=False, output_fmt="NCHW")
            grid = out["image_intermediates"][-1]  # (B, D, h, w)
            return (self._project(grid) if self.cfg.project else grid), out["image_features"]
        final, intermediates = self.model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW")
        return intermediates[-1], self.model.forward_head(final, pre_logits=True)

    def _project(self, grid: Tensor) -> Tensor:
        proj = getattr(self.model, "proj", None)
        if isinstance(proj, Tensor):
            return torch.einsum("bdhw,de->behw", grid, proj.to(grid.dtype))
        head, trunk = getattr(self.model, "head", None), getattr(self.model, "trunk", None)
        if isinstance(head, nn.Sequential) and "pool" not in head._modules and trunk is not None:
            # open_clip TimmModel (EVA02-*): the trunk's classifier and the adapter head, per token.
            per_token = nn.Sequential(trunk.get_classifier(), head)
            return per_token(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        raise UserError(f"teacher.project=true: the {type(self.model).__name__} tower of "
                         f"{self.cfg.model_name!r} has no per-token projection; set teacher.project=false.")

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise unless the teacher's token grid can be pooled onto the student's ``grid``."""
        (th, tw), (sh, sw) = self.grid, grid
        if th < sh or tw < sw:
            raise UserError(
                f"teacher grid {th}x{tw} (at {self.input_size[0]}x{self.input_size[1]} px) is coarser than the "
                f"student's {sh}x{sw}: its targets would be interpolated, not measured. Use a student with "
                f"fewer patches (larger patch_size or smaller img_size) or a teacher with a finer grid."
            )

    def forward(self, imgs: Tensor, grid: tuple[int, int]) -> Tensor:
        """Targets for every student patch (a plain tensor, safe to use in the loss).

        Shapes:
            imgs: (B, C, H, W), ImageNet-normalised -> (B, L, D) with L = grid[0] * grid[1]
        """
        return self.targets(imgs, grid)[0]

    def targets(self, imgs: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Targets for every student patch and the teacher's pooled feature (plain tensors).

        Shapes:
            imgs: (B, C, H, W), ImageNet-normalised -> (B, L, D) with L = grid[0] * grid[1], (B, D_pool)
        """
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=imgs.is_cuda):
            x = imgs * self.scale + self.shift
            if tuple(x.shape[-2:]) != self.input_size:
                x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
            feats, pooled = self.tokens(x)
            feats = feats.float()  # (B, D, h, w)
            if tuple(feats.shape[-2:]) != tuple(grid):
                feats = F.adaptive_avg_pool2d(feats, grid)  # (B, D, grid_h, grid_w)
            feats = feats.flatten(2).transpose(1, 2)  # (B, L, D)
            if self.cfg.normalize_targets:
                feats = F.layer_norm(feats, feats.shape[-1:], eps=1e-6)
        # Normal tensors: inference tensors cannot be saved for backward.
        return feats.clone(), pooled.float().clone()

"""Key layouts of the official MAE and ConvNeXt V2 checkpoints, converted to timm's.

MAE (He et al. 2021) released ViT encoders in the layout of timm's ``VisionTransformer``
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N``, ``norm``), so only the
architecture must be found. ConvNeXt V2 (Woo et al. 2023) released two layouts: the dense one
of its fine-tuned models (``downsample_layers.I.J``, ``stages.I.J.dwconv``/``pwconv1``/``grn``,
a final ``norm`` and ``head``) and the FCMAE pretraining one, whose ``encoder.`` holds
MinkowskiEngine sparse modules (see :func:`fcmae_to_dense`).
"""

from __future__ import annotations

import math
import re

import timm
from torch import Tensor, nn

from ssl_kit.errors import UserError

#: (embed_dim, depth) of the ViT sizes MAE released (and tiny/small, handy for tests) -> timm size name.
VIT_SIZES = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large", (1280, 32): "huge"}

#: Stem width -> timm ConvNeXt V2 name (the depths follow from the name; checked on load).
CONVNEXTV2_SIZES = {
    40: "convnextv2_atto", 48: "convnextv2_femto", 64: "convnextv2_pico", 80: "convnextv2_nano",
    96: "convnextv2_tiny", 128: "convnextv2_base", 192: "convnextv2_large", 352: "convnextv2_huge",
}

#: Keys of an FCMAE checkpoint outside the encoder: decoder, mask token, projection, prediction.
FCMAE_ENCODER_PREFIX = "encoder."


def is_mae_vit(state: dict[str, Tensor]) -> bool:
    return "patch_embed.proj.weight" in state and any(k.startswith("blocks.") for k in state)


def is_convnextv2_dense(state: dict[str, Tensor]) -> bool:
    return "downsample_layers.0.0.weight" in state and any(k.startswith("stages.") for k in state)


def is_fcmae(state: dict[str, Tensor]) -> bool:
    return any(k.startswith(FCMAE_ENCODER_PREFIX + "downsample_layers.") for k in state)


def _num_blocks(state: dict[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def mae_vit_spec(state: dict[str, Tensor], model_name: str | None) -> tuple[str, dict, dict[str, Tensor]]:
    """(timm name, timm kwargs, state) of an official MAE ViT encoder; the encoder's own keys
    are timm's, decoder keys (``decoder_*``, ``mask_token``) are dropped.

    The architecture is inferred from the shapes (width, depth, patch size, position-embedding
    grid) unless ``model_name`` names it; the head count is not in the shapes, so an unusual width/depth
    pair needs ``model_name``.
    """
    state = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    width = state["patch_embed.proj.weight"].shape[0]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = _num_blocks(state, r"blocks\.(\d+)\.")
    n_prefix = 1 if "cls_token" in state else 0
    grid = math.isqrt(state["pos_embed"].shape[1] - n_prefix) if "pos_embed" in state else 224 // patch
    if model_name is None:
        size = VIT_SIZES.get((width, depth))
        if size is None:
            known = ", ".join(f"{s} (width {w}, depth {d})" for (w, d), s in VIT_SIZES.items())
            raise UserError(f"cannot infer the ViT of an MAE checkpoint with width {width} and depth {depth} "
                             f"(known: {known}); pass model_name, e.g. model_name='vit_base_patch16_224'.")
        named = f"vit_{size}_patch{patch}_224"
        model_name = named if timm.is_model(named) else f"vit_{size}_patch16_224"
    kwargs = {"patch_size": patch, "img_size": grid * patch}
    if "fc_norm.weight" in state:  # fine-tuned with global average pooling: fc_norm replaces norm
        kwargs["global_pool"] = "avg"
    return model_name, kwargs, state


def _sparse_kernel_to_dense(kernel: Tensor) -> Tensor:
    """A MinkowskiEngine 2-D kernel as a dense conv weight.

    The kernel's first axis enumerates the k x k offsets column-major (offset index = w * k + h).

    Shapes:
        kernel: (k*k, C) depthwise -> (C, 1, k, k); (k*k, C_in, C_out) -> (C_out, C_in, k, k)
    """
    k = math.isqrt(kernel.shape[0])
    if kernel.ndim == 2:
        return kernel.reshape(k, k, -1).permute(2, 1, 0).unsqueeze(1).contiguous()  # (C, 1, h, w)
    return kernel.reshape(k, k, *kernel.shape[1:]).permute(3, 2, 1, 0).contiguous()  # (C_out, C_in, h, w)


def fcmae_to_dense(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder of an FCMAE pretraining checkpoint in the dense official layout.

    Sparse modules differ from dense ones in three ways: convolution ``kernel`` tensors (see
    :func:`_sparse_kernel_to_dense`), LayerNorm/Linear wrapped as ``.ln``/``.linear``
    sub-modules, and GRN parameters and biases stored as (1, C) (reshaped on load). There is no
    final norm: the pretraining encoder ends at the last stage.
    """
    dense = {}
    for key, value in state.items():
        if not key.startswith(FCMAE_ENCODER_PREFIX):
            continue  # decoder, mask_token, proj, pred
        key = key[len(FCMAE_ENCODER_PREFIX):].replace(".ln.", ".").replace(".linear.", ".")
        if key.endswith(".kernel"):
            key, value = key[: -len("kernel")] + "weight", _sparse_kernel_to_dense(value)
        dense[key] = value
    return dense


def convnextv2_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A dense official ConvNeXt V2 state dict in timm's ``convnextv2_*`` keys and shapes: timm's
    own converter (``timm.models.convnext.checkpoint_filter_fn``: ``downsample_layers`` -> ``stem`` /
    ``stages.N.downsample``, ``dwconv`` -> ``conv_dw``, ``pwconv`` -> ``mlp.fc``, GRN and Linear
    shapes to the model's)."""
    from timm.models.convnext import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def convnextv2_spec(state: dict[str, Tensor], model_name: str | None) -> tuple[str, dict, dict[str, Tensor]]:
    """(timm name, timm kwargs, state in the dense official layout) of an official ConvNeXt V2
    checkpoint, dense or FCMAE layout (:func:`convnextv2_to_timm` maps it to timm's keys once the
    model exists). The size is inferred from the stem width unless ``model_name`` names it."""
    if is_fcmae(state):
        state = fcmae_to_dense(state)
    width = state["downsample_layers.0.0.weight"].shape[0]
    if model_name is None:
        model_name = CONVNEXTV2_SIZES.get(width)
        if model_name is None:
            raise UserError(f"cannot infer the ConvNeXt V2 size from stem width {width} "
                             f"(known: {sorted(CONVNEXTV2_SIZES)}); pass model_name, e.g. model_name='convnextv2_base'.")
    return model_name, {}, state

"""``load_encoder``: any encoder source -> a timm model mapping images to (B, D) features."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ssl_kit.backbones.vit import check_timm_name
from ssl_kit.errors import CorruptCheckpointError, MissingFileError, UserError
from ssl_kit.evaluators import official
from ssl_kit.export import METADATA_KEY, encoder_from_checkpoint, load_checkpoint
from ssl_kit.integrity import check_finite, verify_export

ACCEPTED_FORMATS = (
    "an ssl_kit training checkpoint (.ckpt with an 'ssl_kit' entry and a 'state_dict')",
    "an exported .safetensors (metadata 'timm_model'/'timm_kwargs'; other timm-layout files with arch=) or export folder",
    "an official MAE checkpoint (.pth with a 'model' dict: cls_token, pos_embed, patch_embed.*, blocks.*)",
    "an official ConvNeXt V2 checkpoint ('model' dict, dense 'downsample_layers.*' or FCMAE 'encoder.*' layout)",
    "a timm model name (random initialisation)",
)

#: Keys of the classifier head; a file may lack them (FCMAE has no final norm, ``head.norm``).
HEAD_PREFIXES = ("head.",)

#: Suffixes that mark ``source`` as a file path rather than a timm name (which may carry a ``.tag``).
FILE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".pth.tar", ".tar")

#: Harmless non-tensor objects found in official training checkpoints (their ``args``).
SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class EncoderWeights:
    """What a source says about its encoder: timm name and kwargs, weights in timm's key layout."""

    name: str
    kwargs: dict = field(default_factory=dict)
    state: dict[str, Tensor] | None = None  # None: random initialisation
    img_size: int | None = None  # resolution the weights were trained at, when known
    kind: str = "timm"


def load_encoder(source: str | Path, arch: str | None = None, img_size: int | None = None) -> nn.Module:
    """Build an encoder from any supported source, ready for feature extraction.

    Accepts an ssl_kit checkpoint of any method, an exported ``.safetensors``, an official MAE
    or ConvNeXt V2 (dense or FCMAE) checkpoint, or a timm model name (random init, the
    baseline). The result is a timm model with ``num_classes=0`` in eval mode; its
    ``pretrained_cfg["input_size"]`` holds the resolution it was built for.

    Args:
        source: a file path or a timm model name.
        arch: timm model name, for files that do not name their architecture (official MAE /
            ConvNeXt V2 checkpoints are inferred from their shapes when it is None).
        img_size: evaluation resolution; ViT position embeddings are interpolated when it
            differs from the checkpoint's.

    Raises:
        ValueError: unknown format (lists the accepted ones and the keys found), or encoder
            weights missing from the file (listed; missing head keys are fine).

    Shapes:
        the returned module maps (B, 3, H, W) -> (B, D).

    Examples:
        >>> enc = load_encoder("runs/mae/last.ckpt")  # doctest: +SKIP
        >>> enc = load_encoder("mae_pretrain_vit_base.pth", img_size=224)  # doctest: +SKIP
        >>> feats = load_encoder("resnet18", img_size=32)(torch.randn(2, 3, 32, 32))  # (2, 512)
    """
    weights = read_weights(source, arch)
    model = build(weights, img_size)
    if weights.state is not None:
        load_weights(model, weights.state, f"{source} ({weights.kind})")
    return model.eval()


def read_weights(source: str | Path, arch: str | None = None) -> EncoderWeights:
    """Identify ``source`` and return its architecture and weights in timm's key layout."""
    path = Path(source)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a folder export (timm's hub layout)
        path = path / "model.safetensors"
    if path.is_file():
        if path.suffix == ".safetensors":
            return _read_safetensors(path, arch)
        return _read_torch_file(path, arch)
    if path.suffix in FILE_SUFFIXES or "/" in str(source) or "\\" in str(source):
        raise MissingFileError(f"encoder file {str(source)!r} does not exist.")
    try:
        check_timm_name(str(source))
    except ValueError as err:
        raise UserError(f"{err} --encoder accepts {_formats()}") from None
    return EncoderWeights(str(source))


def _formats() -> str:
    return "; ".join(ACCEPTED_FORMATS) + "."


def _unknown(path: Path, found: list[str]) -> ValueError:
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} in all)" if len(found) > 12 else "")
    return ValueError(f"{path}: unknown encoder file format. Accepted: {_formats()} Keys found: [{shown}].")


def _read_safetensors(path: Path, arch: str | None) -> EncoderWeights:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own types for a truncated or overwritten header
        raise CorruptCheckpointError(f"{path} is truncated or not a safetensors file ({type(err).__name__}: "
                                     f"{str(err).strip()[:200]})") from None
    name = meta.get("timm_model", arch)
    if name is None:
        raise _unknown(path, [f"metadata: {sorted(meta)}"] + keys)
    verify_export(meta, tensors, str(path))
    kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    return EncoderWeights(name, kwargs, tensors, kwargs.get("img_size"), "safetensors")


def _read_torch_file(path: Path, arch: str | None) -> EncoderWeights:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise _unknown(path, [type(ckpt).__name__])
    if METADATA_KEY in ckpt:
        name, kwargs, state = encoder_from_checkpoint(ckpt, str(path))
        hp_size = (ckpt.get("hyper_parameters") or {}).get("img_size")
        return EncoderWeights(name, kwargs, state, kwargs.get("img_size", hp_size), "ssl_kit checkpoint")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise _unknown(path, sorted(ckpt))
    if official.is_mae_vit(state):
        name, kwargs, state = official.mae_vit_spec(state, arch)
        return EncoderWeights(name, kwargs, state, kwargs["img_size"], "MAE ViT layout")
    if official.is_convnextv2_dense(state) or official.is_fcmae(state):
        kind = "ConvNeXt V2 FCMAE layout" if official.is_fcmae(state) else "ConvNeXt V2 dense layout"
        name, kwargs, state = official.convnextv2_spec(state, arch)
        return EncoderWeights(name, kwargs, state, None, kind)
    if arch is not None:  # a plain state dict in timm's layout
        return EncoderWeights(arch, {}, state, None, "timm state dict")
    raise _unknown(path, (["model: " + k for k in sorted(state)] if "model" in ckpt else sorted(ckpt)))


def build(weights: EncoderWeights, img_size: int | None = None) -> nn.Module:
    """A timm model of ``weights``' architecture at ``img_size`` (random weights), ``num_classes=0``."""
    check_timm_name(weights.name)
    kwargs = {k: v for k, v in weights.kwargs.items() if k != "num_classes"}
    size = img_size or weights.img_size
    if size:
        kwargs["img_size"] = size
    try:
        model = timm.create_model(weights.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument 'img_size'" not in str(err):
            raise
        kwargs.pop("img_size")  # CNNs take any resolution
        model = timm.create_model(weights.name, pretrained=False, num_classes=0, **kwargs)
    default = model.pretrained_cfg.get("input_size", (3, 224, 224))
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size) if size else tuple(default)}
    return model


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model``: position embeddings resampled to the model's grid, singleton
    axes reshaped; raises if a weight is not finite, an encoder weight is missing or a key does
    not belong to the model."""
    check_finite(state, source)
    state = _fit_shapes(_resample_pos_embed(dict(state), model), model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: wrong architecture
        raise UserError(f"{source}: the weights do not fit {type(model).__name__}; pass the right "
                         f"arch.\n{err}") from None
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(HEAD_PREFIXES)]
    if missing:
        raise UserError(f"{source}: {len(missing)} encoder weights are missing from the file: {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''} (missing head keys are fine).")
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} weights do not belong to the encoder "
                         f"({type(model).__name__}): {unexpected[:20]}; is arch right?")


def _resample_pos_embed(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, Tensor) or pos.shape == target.shape:
        return state
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = list(model.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=n_prefix)  # (1, n + L', D)
    return state


def _fit_shapes(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Reshape tensors that differ from the model's only by singleton axes ((4C, C) vs (4C, C, 1, 1))."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape and _squeezed(value.shape) == _squeezed(own[key].shape):
            state[key] = value.reshape(own[key].shape)
    return state


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)

"""``load_encoder``: any encoder source -> a timm model mapping images to (B, D) features.

The one reader of encoder weights: ssl_kit checkpoints (through :mod:`ssl_kit.checkpoints.format`),
exports, the official MAE / ConvNeXt V2 layouts (:mod:`ssl_kit.checkpoints.official`, converted
with timm's own ``checkpoint_filter_fn`` where one applies), and :func:`load_strict`, which
every strict load of a state dict (encoders, EVA's open_clip teacher) goes through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ssl_kit.checkpoints import official
from ssl_kit.checkpoints.files import read_safetensors
from ssl_kit.checkpoints.format import METADATA_KEY, encoder_from_checkpoint, read_export_metadata
from ssl_kit.checkpoints.integrity import check_finite
from ssl_kit.checkpoints.timm_names import check_timm_name
from ssl_kit.checkpoints.verified import load_checkpoint
from ssl_kit.errors import MissingFileError, UserError

ACCEPTED_FORMATS = (
    "an ssl_kit training checkpoint (.ckpt with an 'ssl_kit' entry and a 'state_dict')",
    "an exported .safetensors (metadata 'timm_model'/'timm_kwargs'; other timm-layout files with "
    "model_name=) or export folder",
    "an official MAE checkpoint (.pth with a 'model' dict: cls_token, pos_embed, patch_embed.*, blocks.*)",
    "an official ConvNeXt V2 checkpoint ('model' dict, dense 'downsample_layers.*' or FCMAE 'encoder.*' layout)",
    "a timm model name (random initialisation)",
)

#: Keys of the classifier head; a file may lack them (FCMAE has no final norm, ``head.norm``).
HEAD_PREFIXES = ("head.",)

#: Suffixes that mark ``source`` as a file path rather than a timm name (which may carry a ``.tag``).
FILE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin", ".safetensors", ".pth.tar", ".tar")


@dataclass
class EncoderWeights:
    """What a source says about its encoder: timm name and kwargs, weights, and how to bring the
    weights into timm's key layout once the model exists (``convert(state, model)``)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    state: dict[str, Tensor] | None = None  # None: random initialisation
    img_size: int | None = None  # resolution the weights were trained at, when known
    kind: str = "timm"
    convert: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] | None = None


def load_encoder(source: str | Path, model_name: str | None = None, img_size: int | None = None) -> nn.Module:
    """Build an encoder from any supported source, ready for feature extraction.

    Accepts an ssl_kit checkpoint of any method, an exported ``.safetensors``, an official MAE
    or ConvNeXt V2 (dense or FCMAE) checkpoint, or a timm model name (random init, the
    baseline). The result is a timm model with ``num_classes=0`` in eval mode; its
    ``pretrained_cfg["input_size"]`` holds the resolution it was built for.

    Args:
        source: a file path or a timm model name.
        model_name: timm model name, for files that do not name their architecture (official MAE /
            ConvNeXt V2 checkpoints are inferred from their shapes when it is None).
        img_size: evaluation resolution; ViT position embeddings are interpolated when it
            differs from the checkpoint's.

    Raises:
        UserError: unknown format (lists the accepted ones and the keys found), or encoder
            weights missing from the file (listed; missing head keys are fine).

    Shapes:
        the returned module maps (B, 3, H, W) -> (B, D).

    Examples:
        >>> enc = load_encoder("runs/mae/last.ckpt")  # doctest: +SKIP
        >>> enc = load_encoder("mae_pretrain_vit_base.pth", img_size=224)  # doctest: +SKIP
        >>> feats = load_encoder("resnet18", img_size=32)(torch.randn(2, 3, 32, 32))  # (2, 512)
    """
    weights = read_weights(source, model_name)
    model = build(weights, img_size)
    if weights.state is not None:
        state = weights.convert(weights.state, model) if weights.convert is not None else weights.state
        load_weights(model, state, f"{source} ({weights.kind})")
    return model.eval()


def read_weights(source: str | Path, model_name: str | None = None) -> EncoderWeights:
    """Identify ``source`` and return its architecture and weights."""
    path = Path(source)
    if path.is_dir() and (path / "model.safetensors").is_file():  # a folder export (timm's hub layout)
        path = path / "model.safetensors"
    if path.is_file():
        if path.suffix == ".safetensors":
            return _read_safetensors(path, model_name)
        return _read_torch_file(path, model_name)
    if path.suffix in FILE_SUFFIXES or "/" in str(source) or "\\" in str(source):
        raise MissingFileError(f"encoder file {str(source)!r} does not exist.")
    try:
        check_timm_name(str(source))
    except UserError as err:
        raise UserError(f"{err} --encoder accepts {_formats()}") from None
    return EncoderWeights(str(source))


def _formats() -> str:
    return "; ".join(ACCEPTED_FORMATS) + "."


def _unknown(path: Path, found: list[str]) -> UserError:
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} in all)" if len(found) > 12 else "")
    return UserError(f"{path}: unknown encoder file format. Accepted: {_formats()} Keys found: [{shown}].")


def _read_safetensors(path: Path, model_name: str | None) -> EncoderWeights:
    meta, tensors = read_safetensors(path)
    if meta.get("timm_model", model_name) is None:
        raise _unknown(path, [f"metadata: {sorted(meta)}"] + list(tensors))
    name, kwargs = read_export_metadata(meta, tensors, str(path), model_name)
    return EncoderWeights(name, kwargs, tensors, kwargs.get("img_size"), "safetensors")


def _read_torch_file(path: Path, model_name: str | None) -> EncoderWeights:
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
        name, kwargs, state = official.mae_vit_spec(state, model_name)
        return EncoderWeights(name, kwargs, state, kwargs["img_size"], "MAE ViT layout")
    if official.is_convnextv2_dense(state) or official.is_fcmae(state):
        kind = "ConvNeXt V2 FCMAE layout" if official.is_fcmae(state) else "ConvNeXt V2 dense layout"
        name, kwargs, state = official.convnextv2_spec(state, model_name)
        return EncoderWeights(name, kwargs, state, None, kind, convert=official.convnextv2_to_timm)
    if model_name is not None:  # a plain state dict in timm's layout
        return EncoderWeights(model_name, {}, state, None, "timm state dict")
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
    """Load encoder weights in timm's layout into ``model``, position embeddings resampled to the
    model's grid; raises if a weight is not finite, an encoder weight is missing or a key does not
    belong to the model (missing classifier-head keys are fine)."""
    check_finite(state, source)
    load_strict(model, _resample_pos_embed(dict(state), model), source, optional=HEAD_PREFIXES)


def load_strict(model: nn.Module, state: dict[str, Tensor], source: str, optional: tuple[str, ...] = ()) -> None:
    """``model.load_state_dict(state)`` that lists every missing, unexpected and mis-shaped key in
    one :class:`UserError` (keys under ``optional`` may be missing or unexpected).

    Raises:
        UserError: the file does not match the model.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected and not k.startswith(optional)]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

        raise UserError(f"{source}: the weights do not match {type(model).__name__} (is model_name right?): "
                        f"{len(missing)} missing keys: {few(missing) or '-'}; {len(unexpected)} unexpected keys: "
                        f"{few(unexpected) or '-'}; shape mismatches: {few(shapes) or '-'}.")
    model.load_state_dict(state, strict=False)


def _resample_pos_embed(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    pos = state.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, Tensor) or pos.shape == target.shape:
        return state
    n_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = list(model.patch_embed.grid_size)
    state["pos_embed"] = resample_abs_pos_embed(pos, new_size=grid, num_prefix_tokens=n_prefix)  # (1, n + L', D)
    return state

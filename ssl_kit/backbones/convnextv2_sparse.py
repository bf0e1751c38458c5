"""timm ConvNeXt V2 with FCMAE's sparse forward, and the dense-masked definition it must equal.

ConvNeXt V2 (Woo et al., 2023, arXiv:2301.00808), Sec. 3: the encoder only ever sees visible
pixels. Instead of a sparse-convolution library this module runs the timm model's own parameters
on the visible positions of each stage, kept as a (B*N, C) tensor of "sites":

- per-position layers (LayerNorm, both 1x1 linears, GELU, GRN; nearly all FLOPs) run on the
  gathered sites only;
- the depthwise 7x7 conv runs on the zero-filled dense map, then is read back at the sites
  (a zero contributes nothing, so this is exactly submanifold depthwise convolution);
- the stem and downsampling convs (kernel == stride) are linears on the windows of visible
  cells; a visible cell's window is entirely visible because the mask is upsampled from the
  coarsest stage;
- GRN's L2 norm is per image over that image's visible positions only (the official sparse GRN
  pools over the whole batch; not repeated here).

Every image keeps the same number of cells (see ``ssl_kit.masking.hierarchical``), so sites of a
batch reshape to a regular (B, N, C) tensor for GRN and stochastic depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import GlobalResponseNormMlp
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXt
from torch import Tensor, nn

from ssl_kit.checkpoints.timm_names import check_timm_name
from ssl_kit.errors import UserError
from ssl_kit.losses.pixel import patchify
from ssl_kit.masking.hierarchical import kept_indices, upsample_mask


def create_convnextv2(model_name: str, in_chans: int = 3, drop_path_rate: float = 0.0, **kwargs) -> ConvNeXt:
    """Build a randomly initialised timm ConvNeXt V2 without classifier, checking the name first.

    Args:
        model_name: one of timm's ``convnextv2_*`` names (``convnextv2_atto`` ... ``convnextv2_huge``).
        in_chans: input channels.
        drop_path_rate: stochastic depth.
        **kwargs: passed to ``timm.create_model``.
    """
    check_timm_name(model_name)
    if not model_name.startswith("convnextv2_"):
        names = ", ".join(sorted(timm.list_models("convnextv2_*")))
        raise UserError(f"{model_name!r} is not a ConvNeXt V2; FCMAE needs one of timm's convnextv2_* models: {names}.")
    model = timm.create_model(
        model_name, pretrained=False, num_classes=0, in_chans=in_chans, drop_path_rate=drop_path_rate, **kwargs
    )
    check_sparse_layout(model)
    return fast_grn_(model)


def grn_norm(x: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """GRN's L2 norm over ``dim`` (kept), as the square root of the sum of squares.

    Equal to ``x.norm(p=2, dim=dim, keepdim=True)`` up to rounding, but torch's ``vector_norm`` on
    CPU is slow when it reduces dimensions other than the innermost: ~8 ms against ~0.15 ms for a
    (64, 3, 3, 1280) tensor (2 threads), where a plain sum is fast. A zero norm has gradient 0, as
    ``norm``'s (the clamp stops ``sqrt``'s infinite slope at 0).
    """
    return x.square().sum(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt()


class FastGlobalResponseNorm(GlobalResponseNorm):
    """timm's GRN (same parameters and state dict) with its norm taken by :func:`grn_norm`."""

    def forward(self, x: Tensor) -> Tensor:
        gx = grn_norm(x, self.spatial_dim)
        nx = gx / (gx.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        return x + torch.addcmul(self.bias.view(self.wb_shape), self.weight.view(self.wb_shape), x * nx)


def fast_grn_(model: nn.Module) -> nn.Module:
    """Switch every timm GRN of ``model`` to :class:`FastGlobalResponseNorm` in place; returns ``model``.

    Only the class changes: parameters, buffers and state-dict keys stay timm's, so checkpoints
    load and export as before. With it a ConvNeXt V2-Atto step at 96 px on 2 CPU cores no longer
    spends 10-30% of its time in ``vector_norm``.
    """
    for module in model.modules():
        if type(module) is GlobalResponseNorm:
            module.__class__ = FastGlobalResponseNorm
    return model


def fcmae_init_(model: ConvNeXt) -> ConvNeXt:
    """Re-initialise a timm ConvNeXt V2 as the official FCMAE pretraining code does (its
    ``_init_weights`` runs over the whole model after the encoder's own): depthwise convs,
    per-position linears and the stem drawn from a truncated normal with std 1 (truncated at
    +-2), downsampling convs std 0.02, every bias 0, LayerNorms (1, 0); GRN stays zero. timm's
    default is std 0.02 everywhere. Returns ``model``.
    """
    for block in (b for stage in model.stages for b in stage.blocks):
        for layer in (block.conv_dw, block.mlp.fc1, block.mlp.fc2):
            nn.init.trunc_normal_(layer.weight.data.view(layer.weight.shape[0], -1), std=1.0, a=-2.0, b=2.0)
            nn.init.zeros_(layer.bias)
    stem = model.stem[0]
    nn.init.trunc_normal_(stem.weight.data.view(stem.weight.shape[0], -1), std=1.0, a=-2.0, b=2.0)
    nn.init.zeros_(stem.bias)
    for stage in model.stages:
        if not isinstance(stage.downsample, nn.Identity):
            nn.init.trunc_normal_(stage.downsample[1].weight, std=0.02)
            nn.init.zeros_(stage.downsample[1].bias)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _is_patch_conv(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride and conv.padding == (0, 0)


def check_sparse_layout(model: nn.Module) -> None:
    """Raise unless ``model`` has the layout the sparse forward runs: patch stem, kernel==stride
    downsampling, GRN blocks with an identity shortcut, per-position LayerNorms."""
    problems = []
    if not isinstance(model, ConvNeXt):
        problems.append(f"it is a {type(model).__name__}, not a timm ConvNeXt")
    elif not (_is_patch_conv(model.stem[0]) and isinstance(model.stem[1], nn.LayerNorm)):
        problems.append("its stem is not a patch conv + LayerNorm (stem_type='patch')")
    else:
        for i, stage in enumerate(model.stages):
            ds = stage.downsample
            if not isinstance(ds, nn.Identity) and not (isinstance(ds[0], nn.LayerNorm) and _is_patch_conv(ds[1])):
                problems.append(f"stage {i} downsampling is not LayerNorm + kernel==stride conv")
            for block in stage.blocks:
                if not (isinstance(block.mlp, GlobalResponseNormMlp) and isinstance(block.shortcut, nn.Identity)
                        and block.conv_dw.stride == (1, 1) and isinstance(block.norm, nn.LayerNorm)):
                    problems.append(f"stage {i} has a block without GRN, stride 1 and identity shortcut")
                    break
    if problems:
        raise UserError(f"the sparse ConvNeXt V2 forward cannot run this model: {'; '.join(problems)}.")


def total_stride(model: ConvNeXt) -> int:
    """Input pixels per cell of the last stage (32 for every ConvNeXt V2): the mask's patch size."""
    return int(model.feature_info[-1]["reduction"])


def check_input(model: ConvNeXt, imgs: Tensor, mask: Tensor) -> int:
    """Raise unless the image sides are multiples of the total stride s and ``mask`` is (B, H/s, W/s).

    Returns:
        the total stride s.
    """
    s = total_stride(model)
    B, _, H, W = imgs.shape
    if H % s or W % s:
        raise ValueError(f"image size {H}x{W} is not divisible by the network's total stride {s}; "
                         f"use sides that are multiples of {s}.")
    if tuple(mask.shape) != (B, H // s, W // s):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(imgs.shape)}: "
                         f"expected ({B}, {H // s}, {W // s}), one cell per {s}x{s} patch.")
    return s


@dataclass(frozen=True)
class Sites:
    """The visible positions of one stage: row indices into the flattened (B*H*W) map."""

    flat: Tensor  # (B*N,) ascending
    batch: int
    height: int
    width: int

    @classmethod
    def from_mask(cls, mask: Tensor, factor: int) -> "Sites":
        """Sites of ``mask`` (B, h, w) upsampled by ``factor``."""
        up = upsample_mask(mask, factor)  # (B, H, W)
        B, H, W = up.shape
        ids = kept_indices(up)  # (B, N)
        offsets = torch.arange(B, device=ids.device).unsqueeze(1) * (H * W)
        return cls((ids + offsets).flatten(), B, H, W)

    @property
    def per_image(self) -> int:
        return self.flat.numel() // self.batch


def scatter_sites(x: Tensor, sites: Sites) -> Tensor:
    """Zero-filled dense map holding ``x`` at the sites (channels-last in memory).

    Shapes:
        x: (B*N, C) -> (B, C, H, W)
    """
    C = x.shape[-1]
    dense = x.new_zeros(sites.batch * sites.height * sites.width, C).index_copy(0, sites.flat, x)
    return dense.view(sites.batch, sites.height, sites.width, C).permute(0, 3, 1, 2)  # (B, C, H, W)


def gather_sites(dense: Tensor, sites: Sites) -> Tensor:
    """Read a dense map at the sites.

    Shapes:
        dense: (B, C, H, W) -> (B*N, C)
    """
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, sites.flat)  # (B*N, C)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _linear(layer: nn.Module, x: Tensor) -> Tensor:
    """A timm 1x1 conv (small models, ``conv_mlp``) or Linear (larger ones) applied per site."""
    return F.linear(x, layer.weight.flatten(1), layer.bias)


def _patch_linear(conv: nn.Conv2d, windows: Tensor) -> Tensor:
    """A kernel==stride conv as a linear on flattened (k, k, C_in) windows."""
    return F.linear(windows, conv.weight.permute(0, 2, 3, 1).flatten(1), conv.bias)


def sparse_grn(grn: nn.Module, x: Tensor) -> Tensor:
    """GRN with timm's parameters, its L2 norm taken per image over that image's sites only.

    Shapes:
        x: (B, N, C) -> (B, N, C)
    """
    gx = grn_norm(x, 1)  # (B, 1, C)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
    return x + torch.addcmul(grn.bias, grn.weight, x * nx)


def sparse_stem(stem: nn.Sequential, imgs: Tensor, sites: Sites) -> Tensor:
    """Patch conv + LayerNorm on the visible stem cells only.

    Shapes:
        imgs: (B, C_in, H, W) -> (B*N, D)
    """
    conv, norm = stem[0], stem[1]
    patches = patchify(imgs, conv.stride[0]).flatten(0, 1)  # (B*H0*W0, p*p*C_in) in (p, p, C) order
    return _layer_norm(norm, _patch_linear(conv, patches.index_select(0, sites.flat)))


def sparse_downsample(ds: nn.Sequential, x: Tensor, sites: Sites, out: Sites) -> Tensor:
    """LayerNorm, then the kernel==stride conv evaluated at the visible output cells only.

    Shapes:
        x: (B*N, C) -> (B*N', C')
    """
    norm, conv = ds[0], ds[1]
    k = conv.stride[0]
    x = _layer_norm(norm, x)
    row = torch.full((sites.batch * sites.height * sites.width,), -1, dtype=torch.long, device=x.device)
    row[sites.flat] = torch.arange(sites.flat.numel(), device=x.device)  # map position -> row of x
    b, rest = out.flat // (out.height * out.width), out.flat % (out.height * out.width)
    i, j = rest // out.width, rest % out.width
    dy, dx = torch.meshgrid(torch.arange(k, device=x.device), torch.arange(k, device=x.device), indexing="ij")
    pos = (b.view(-1, 1, 1) * sites.height + i.view(-1, 1, 1) * k + dy) * sites.width + j.view(-1, 1, 1) * k + dx
    rows = row[pos.flatten()]  # (N' * k * k,) in (cell, dy, dx) order
    if bool((rows < 0).any()):
        raise ValueError("a visible cell's downsampling window holds removed positions; "
                         "the mask must be upsampled from the coarsest stage.")
    windows = x.index_select(0, rows).reshape(out.flat.numel(), k * k * x.shape[-1])  # (B*N', k*k*C)
    return _patch_linear(conv, windows)


def sparse_block(block: nn.Module, x: Tensor, sites: Sites) -> Tensor:
    """One ConvNeXt V2 block on the sites: dense zero-filled depthwise conv, the rest per site.

    Shapes:
        x: (B*N, C) -> (B*N, C)
    """
    B, N, C = sites.batch, sites.per_image, x.shape[-1]
    y = gather_sites(block.conv_dw(scatter_sites(x, sites)), sites)  # (B*N, C)
    y = _layer_norm(block.norm, y)
    mlp = block.mlp
    y = mlp.drop1(mlp.act(_linear(mlp.fc1, y)))  # (B*N, 4C)
    y = sparse_grn(mlp.grn, y.view(B, N, -1)).flatten(0, 1)  # (B*N, 4C)
    y = mlp.drop2(_linear(mlp.fc2, y))  # (B*N, C)
    if block.gamma is not None:
        y = y * block.gamma
    return x + block.drop_path(y.view(B, N, C)).flatten(0, 1)  # stochastic depth per image


def forward_sparse(model: ConvNeXt, imgs: Tensor, mask: Tensor) -> Tensor:
    """The encoder on the visible cells only; removed cells carry nothing into any output.

    Args:
        model: a timm ConvNeXt V2 (see :func:`check_sparse_layout`).
        imgs: input images; sides divisible by the total stride s.
        mask: 0 = keep, 1 = removed, one cell per s x s patch; the same count kept in every image.

    Shapes:
        imgs: (B, C_in, H, W); mask: (B, H/s, W/s) -> (B, D, H/s, W/s), zero at removed cells.
    """
    s = check_input(model, imgs, mask)
    reductions = [int(info["reduction"]) for info in model.feature_info]
    sites = Sites.from_mask(mask, s // reductions[0])
    x = sparse_stem(model.stem, imgs, sites)  # (B*N, D0)
    for stage, r in zip(model.stages, reductions):
        if not isinstance(stage.downsample, nn.Identity):
            out = Sites.from_mask(mask, s // r)
            x = sparse_downsample(stage.downsample, x, sites, out)
            sites = out
        for block in stage.blocks:
            x = sparse_block(block, x, sites)
    if not isinstance(model.norm_pre, nn.Identity):
        x = _layer_norm(model.norm_pre, x)
    return scatter_sites(x, sites)


def forward_dense_masked(model: ConvNeXt, imgs: Tensor, mask: Tensor) -> Tensor:
    """The definition :func:`forward_sparse` implements: timm's dense modules on full maps, with
    removed positions zeroed after the stem, every downsampling and every block, and before GRN
    (so GRN's L2 norm sees visible positions only). Slow; a reference for tests and benchmarks.

    Shapes:
        imgs: (B, C_in, H, W); mask: (B, H/s, W/s) -> (B, D, H/s, W/s), zero at removed cells.
    """
    s = check_input(model, imgs, mask)
    reductions = [int(info["reduction"]) for info in model.feature_info]
    keep = 1 - upsample_mask(mask, s // reductions[0]).unsqueeze(1)  # (B, 1, H0, W0)
    x = model.stem(imgs) * keep
    for stage, r in zip(model.stages, reductions):
        if not isinstance(stage.downsample, nn.Identity):
            keep = 1 - upsample_mask(mask, s // r).unsqueeze(1)
            x = stage.downsample(x) * keep
        for block in stage.blocks:
            x = _dense_masked_block(block, x, keep)
    return model.norm_pre(x) * keep


def _dense_masked_block(block: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    y = block.conv_dw(x)
    if not block.use_conv_mlp:
        y, keep_y = y.permute(0, 2, 3, 1), keep.permute(0, 2, 3, 1)  # (B, H, W, C): Linear/LayerNorm layout
    else:
        keep_y = keep
    mlp = block.mlp
    y = mlp.drop1(mlp.act(mlp.fc1(block.norm(y)))) * keep_y
    y = mlp.drop2(mlp.fc2(mlp.grn(y)))
    if not block.use_conv_mlp:
        y = y.permute(0, 3, 1, 2)
    if block.gamma is not None:
        y = y * block.gamma.reshape(1, -1, 1, 1)
    return (x + block.drop_path(y)) * keep

"""FCMAE: ConvNeXt V2, Co-designing and Scaling ConvNets with Masked Autoencoders
(Woo et al., 2023, arXiv:2301.00808)."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from torch import Tensor

from ssl_kit.backbones.convnextv2_sparse import check_input, create_convnextv2, fcmae_init_, forward_sparse, total_stride
from ssl_kit.errors import UserError
from ssl_kit.heads.fcmae_decoder import FCMAEDecoder
from ssl_kit.losses import masked_mse, pixel_targets, predictions_to_image
from ssl_kit.masking.hierarchical import random_grid_mask
from ssl_kit.masking.random import check_mask_ratio
from ssl_kit.methods.base import OptimizerCallable, SSLMethod, adamw
from ssl_kit.views import MaskedImageTransform, Views


class FCMAE(SSLMethod):
    """Fully convolutional masked autoencoder on a timm ConvNeXt V2: random patches at the
    network's total stride (32) are removed, the encoder runs sparsely on the visible ones
    (:func:`~ssl_kit.backbones.convnextv2_sparse.forward_sparse`), a one-block ConvNeXt V2
    decoder with mask tokens predicts every patch's pixels; MSE on removed patches.

    Args:
        model_name: timm ConvNeXt V2 name (``convnextv2_atto`` ... ``convnextv2_huge``).
        img_size: training resolution; a multiple of the total stride (32).
        encoder_kwargs: more ``timm.create_model`` arguments for the encoder (e.g. ``depths``
            for a ConvNeXt V2 shallower than the name's, with the name's widths).
        mask_ratio: fraction of patches removed, in (0, 1) (paper: 0.6).
        decoder_embed_dim: decoder width (paper: 512).
        decoder_depth: decoder ConvNeXt V2 blocks (paper: 1).
        norm_pix_loss: regress per-patch normalised pixels (paper's setting).
        drop_path_rate: encoder stochastic depth.
        init: ``fcmae``: the official FCMAE code's re-initialisation of the encoder
            (:func:`~ssl_kit.backbones.convnextv2_sparse.fcmae_init_`); ``timm``: timm's default.
        crop_scale: RandomResizedCrop area range.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> fcmae = FCMAE("convnextv2_atto", img_size=64, decoder_embed_dim=64)
        >>> loss, pred, mask = fcmae(torch.randn(2, 3, 64, 64))  # pred (2, 4, 3072), mask (2, 4)
    """

    fp16_safe = False  # regresses (normalised) pixels, like MAE: fp16 overflows, use bf16

    def __init__(
        self,
        model_name: str = "convnextv2_base",
        img_size: int = 224,
        encoder_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.6,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        init: Literal["fcmae", "timm"] = "fcmae",
        crop_scale: tuple[float, float] = (0.2, 1.0),
        optimizer: OptimizerCallable = adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 40.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.img_size = img_size
        self.norm_pix_loss = norm_pix_loss
        self.crop_scale = tuple(crop_scale)
        self.encoder = self.build_encoder()
        # The classifier-side norm is not on the pretraining path; frozen so DDP sees no unused
        # trainable parameters. timm rebuilds it (trainable) when the encoder is fine-tuned.
        self.encoder.head.requires_grad_(False)
        self.patch_size = total_stride(self.encoder)
        if img_size % self.patch_size:
            raise UserError(f"img_size={img_size} is not divisible by the network's total stride "
                             f"{self.patch_size}; choose a multiple of {self.patch_size}.")
        self.grid = (img_size // self.patch_size, img_size // self.patch_size)
        if int(self.grid[0] * self.grid[1] * (1 - self.mask_ratio)) < 1:
            raise UserError(f"img_size={img_size} gives {self.grid[0] * self.grid[1]} patches of "
                             f"{self.patch_size} px; mask_ratio={mask_ratio} would keep none.")
        self.decoder = FCMAEDecoder(
            in_dim=self.encoder.num_features,
            patch_dim=self.patch_size**2 * 3,
            embed_dim=decoder_embed_dim,
            depth=decoder_depth,
        )

    def build_encoder(self):
        hp = self.hparams
        kwargs = dict(hp.encoder_kwargs or {}, drop_path_rate=hp.drop_path_rate)
        self.encoder_spec = (hp.model_name, kwargs)
        encoder = create_convnextv2(hp.model_name, **kwargs)
        return fcmae_init_(encoder) if hp.init == "fcmae" else encoder

    def train_transform(self) -> Callable:
        return Views(MaskedImageTransform(self.img_size, scale=self.crop_scale))

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode the visible patches sparsely, decode all patches, score the removed ones.

        Args:
            imgs: images, sides multiples of :attr:`patch_size`.
            mask_ratio: overrides the configured ratio for this call.
            mask: a given mask (0 keep, 1 removed) instead of a random one.

        Shapes:
            imgs: (B, C, H, W); mask: (B, h, w) -> loss (), pred (B, L, P), mask (B, L) with 1 = removed.
        """
        B, _, H, W = imgs.shape
        if mask is None:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            mask = self.draw_mask((H // self.patch_size, W // self.patch_size), ratio, B, imgs.device)
        check_input(self.encoder, imgs, mask)
        latent = self.forward_encoder(imgs, mask)  # (B, D, h, w), zero at removed cells
        pred = self.decoder(latent, mask)  # (B, L, P)
        target = pixel_targets(imgs, self.patch_size, self.norm_pix_loss)  # (B, L, P)
        mask = mask.flatten(1)  # (B, L)
        return masked_mse(pred, target, mask), pred, mask

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """The encoder on the visible patches only (sparse convolution); ``python -m ssl_kit.bench.fcmae``
        swaps in dense forwards here to compare.

        Shapes:
            imgs: (B, C, H, W); mask: (B, h, w) -> (B, D, h, w), zero at removed cells.
        """
        return forward_sparse(self.encoder, imgs, mask)

    def draw_mask(self, grid: tuple[int, int], mask_ratio: float, batch_size: int, device: torch.device) -> Tensor:
        """Per-sample masks; in a training step drawn for the global batch from the step generator
        (:meth:`~ssl_kit.methods.base.SSLMethod.draw_global`).

        Shapes:
            returns (B, h, w), 1 = removed.
        """
        return self.draw_global(lambda n, g: random_grid_mask(grid, mask_ratio, n, device, g), batch_size, device)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        (imgs,), _ = batch  # one view
        loss, _, _ = self(imgs)
        self.log_step(loss, batch_size=imgs.shape[0])
        return loss

    @torch.no_grad()
    def reconstruct(self, imgs: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction in image space, norm-pix predictions un-normalised with each patch's stats.

        Shapes:
            imgs: (B, C, H, W) -> recon (B, C, H, W), mask (B, L)
        """
        _, pred, mask = self(imgs)
        return predictions_to_image(pred, imgs, self.patch_size, self.norm_pix_loss), mask

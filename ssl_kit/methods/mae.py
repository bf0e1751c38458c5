"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., 2021, arXiv:2111.06377)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ssl_kit.backbones.vit import create_vit, forward_visible, mae_init_, num_patches
from ssl_kit.heads import MAEDecoder
from ssl_kit.losses import masked_mse, pixel_targets, predictions_to_image
from ssl_kit.masking.random import check_mask_ratio, random_masking
from ssl_kit.methods.base import OptimizerCallable, SSLMethod, adamw
from ssl_kit.views import MaskedImageTransform, Views


class MAE(SSLMethod):
    """Masked autoencoder on a timm ViT: the encoder sees only visible patches; a light decoder
    with mask tokens reconstructs the removed ones; MSE on removed patches.

    Args:
        model_name: timm ViT name (``vit_base_patch16_224``, ``vit_large_patch16_224``, ...).
        img_size: input resolution (divisible by the patch size).
        patch_size: overrides the name's patch size.
        encoder_kwargs: more ``timm.create_model`` arguments for the encoder (e.g. ``embed_dim``,
            ``depth``, ``num_heads`` for a ViT smaller than the name's; ``global_pool``).
        mask_ratio: fraction of patches removed, in (0, 1) (paper: 0.75).
        decoder_embed_dim: decoder width (paper: 512).
        decoder_depth: decoder blocks (paper: 8).
        decoder_num_heads: decoder heads (paper: 16).
        norm_pix_loss: regress per-patch normalised pixels (paper's best setting).
        drop_path_rate: encoder stochastic depth.
        crop_scale: RandomResizedCrop area range.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> mae = MAE("vit_tiny_patch16_224", img_size=32, patch_size=4, decoder_embed_dim=64,
        ...           decoder_depth=1, decoder_num_heads=2)
        >>> loss, pred, mask = mae(torch.randn(2, 3, 32, 32))
    """

    fp16_safe = False  # pixel regression overflows fp16 at scale; use bf16-mixed

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
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
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.decoder = MAEDecoder(
            in_dim=self.encoder.embed_dim,
            grid=self.grid,
            patch_dim=self.patch_size**2 * 3,
            embed_dim=decoder_embed_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            num_prefix_tokens=self.encoder.num_prefix_tokens,
        )

    def build_encoder(self):
        hp = self.hparams
        kwargs = dict(hp.encoder_kwargs or {}, img_size=hp.img_size, drop_path_rate=hp.drop_path_rate)
        if hp.patch_size is not None:
            kwargs["patch_size"] = hp.patch_size
        self.encoder_spec = (hp.model_name, kwargs)
        # The paper's code initialises the encoder its own way (xavier-uniform linears), not timm's;
        # on the digits demo that alone moves random-init k-NN from 59 to 72 and the trained one up too.
        return mae_init_(create_vit(hp.model_name, **kwargs))

    def train_transform(self) -> Callable:
        return Views(MaskedImageTransform(self.img_size, scale=self.crop_scale))

    def forward(self, imgs: Tensor, mask_ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Mask, encode the visible patches, decode all patches, and score the removed ones.

        Shapes:
            imgs: (B, C, H, W) -> loss (), pred (B, L, P), mask (B, L) with 1 = removed.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        ids_keep, mask, ids_restore = self.draw_masks(imgs.shape[0], ratio, imgs.device)
        latent = forward_visible(self.encoder, imgs, ids_keep)  # (B, n_prefix + K, D)
        pred = self.decoder(latent, ids_restore)  # (B, L, P)
        target = pixel_targets(imgs, self.patch_size, self.norm_pix_loss)  # (B, L, P)
        return masked_mse(pred, target, mask), pred, mask

    def draw_masks(self, batch_size: int, mask_ratio: float, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample masks; in a training step a function of (seed, step, position in the global batch).

        Every rank draws the masks of the whole global batch from :meth:`step_generator` and keeps
        its own rows, so a run on N processes masks exactly like one process with the N-fold batch,
        and a resumed run masks like an uninterrupted one.

        Shapes:
            returns ids_keep (B, K), mask (B, L), ids_restore (B, L); see :func:`random_masking`.
        """
        L = num_patches(self.encoder)
        return self.draw_global(lambda n, g: random_masking(L, mask_ratio, n, device, g), batch_size, device)

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

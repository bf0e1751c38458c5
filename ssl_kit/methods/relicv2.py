"""ReLICv2: Pushing the limits of self-supervised ResNets (Tomasev et al., 2022, arXiv:2201.05119)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ssl_kit.errors import UserError
from ssl_kit.heads import ComparisonMLP
from ssl_kit.losses import relicv2_loss, sample_candidates
from ssl_kit.methods.base import OptimizerCallable, SSLMethod
from ssl_kit.methods.ema import EMATarget
from ssl_kit.methods.multiview import by_resolution, multicrop_encoder, gather_batch
from ssl_kit.optim import LARS
from ssl_kit.views.multicrop import BatchedPhotometric, MultiCropTransform, SaliencyMasks, check_multicrop


def lars(params) -> LARS:
    """BYOL's LARS (ReLICv2 follows BYOL's recipe): base lr 0.2 per 256 images, wd 1.5e-6."""
    return LARS(params, lr=0.2, momentum=0.9, weight_decay=1.5e-6, trust_coefficient=0.001)


class ReLICv2(SSLMethod):
    """Online network (timm encoder + comparison MLP) against an EMA target network on multi-crop
    views: large crops go through both networks, small crops through the online network only; the
    loss is contrastive + KL invariance over every (online view, target large view) pair, with
    negatives from the global batch.

    Args:
        model_name: any timm model (``resnet50``, ``convnext_tiny``, ``convmixer_768_32``,
            ``vit_small_patch16_224`` with ``dynamic_img_size``...).
        encoder_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, ``img_size``...).
        img_size: large-crop side (also the evaluation size).
        small_size: small-crop side (<= ``img_size``).
        n_large: large crops per image (>= 1; paper: 4).
        n_small: small crops per image (paper: 2).
        large_scale: RandomResizedCrop area range of large crops.
        small_scale: RandomResizedCrop area range of small crops.
        hidden_dim: comparison-MLP hidden width.
        out_dim: comparison-MLP output width.
        num_layers: comparison-MLP linear layers.
        head_batch_norm: BatchNorm in the comparison MLP's hidden layers.
        temperature: tau of ``phi = cos / tau``.
        alpha: weight of the contrastive term.
        beta: weight of the KL invariance term.
        num_negatives: negatives sampled per anchor from the global batch (None: all others).
        base_momentum: target EMA momentum at the first step.
        final_momentum: target EMA momentum at the last step (cosine in optimizer steps).
        saliency_root: folder of precomputed saliency masks, matched to images by relative path.
        p_m: probability that a large crop is taken from the background-removed image.
        gpu_augment: photometric augmentation batched on the GPU with kornia (None: when training
            on CUDA); otherwise it runs in the CPU data workers.
        sync_batchnorm: convert BatchNorm to SyncBatchNorm when training on several processes.
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`.

    Examples:
        >>> model = ReLICv2("resnet18", img_size=32, small_size=16, n_large=2, n_small=1,
        ...                 hidden_dim=64, out_dim=32)
        >>> views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)]
        >>> loss, contrastive, invariance = model(views)
    """

    fp16_safe = True  # cosine similarities of normalised embeddings and a KL: bounded in fp16

    def __init__(
        self,
        model_name: str = "resnet50",
        encoder_kwargs: dict[str, Any] | None = None,
        img_size: int = 224,
        small_size: int = 96,
        n_large: int = 4,
        n_small: int = 2,
        large_scale: tuple[float, float] = (0.14, 1.0),
        small_scale: tuple[float, float] = (0.05, 0.14),
        hidden_dim: int = 4096,
        out_dim: int = 256,
        num_layers: int = 2,
        head_batch_norm: bool = True,
        temperature: float = 0.1,
        alpha: float = 1.0,
        beta: float = 1.0,
        num_negatives: int | None = None,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        saliency_root: str | None = None,
        p_m: float = 0.0,
        gpu_augment: bool | None = None,
        sync_batchnorm: bool = True,
        optimizer: OptimizerCallable = lars,
        lr_scaling: bool = True,
        warmup_epochs: float = 10.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__(optimizer, lr_scaling, warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        _check_args(n_large, n_small, img_size, small_size, p_m, temperature, alpha, beta, num_negatives,
                    saliency_root)
        self.img_size = img_size
        self.encoder = self.build_encoder()
        self.head = ComparisonMLP(self.encoder.num_features, hidden_dim, out_dim, num_layers, head_batch_norm)
        self.target = EMATarget(nn.Sequential(self.encoder, self.head), base_momentum, final_momentum)
        self._gpu_views: BatchedPhotometric | None = None  # kornia pipelines, when augmenting on the GPU

    # --- encoder and views ----------------------------------------------------------------
    def build_encoder(self) -> nn.Module:
        hp = self.hparams
        encoder, self.encoder_spec = multicrop_encoder(hp.model_name, hp.encoder_kwargs, hp.n_small, hp.small_size,
                                                       "n_small")
        return encoder

    def train_transform(self) -> Callable:
        hp = self.hparams
        saliency = SaliencyMasks(hp.saliency_root) if hp.saliency_root else None
        if saliency is not None:
            saliency.check(self._training_relpaths())
        on_gpu = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        gpu = on_gpu if hp.gpu_augment is None else hp.gpu_augment
        sizes = [hp.img_size] * hp.n_large + [hp.small_size] * hp.n_small
        self._gpu_views = BatchedPhotometric(sizes) if gpu else None
        return MultiCropTransform(hp.n_large, hp.n_small, hp.img_size, hp.small_size, hp.large_scale,
                                  hp.small_scale, saliency, hp.p_m, photometric=not gpu)

    def _training_relpaths(self) -> list[str]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            raise UserError("saliency_root needs the training data module to match masks to images.")
        subset = dm.split("train", None).subset
        source = subset.dataset
        if not hasattr(source, "files"):
            raise UserError(f"saliency_root matches masks to image files: it needs data.dataset=folder, "
                             f"not {dm.dataset!r} (0 images matched).")
        return [source.files[i].relative_to(source.root).as_posix() for i in subset.indices]

    def augment_views(self, views: list[Tensor]) -> list[Tensor]:
        """Batched photometric augmentation + normalisation (the GPU path), per-sample parameters.

        In a training step the parameters are drawn for the global batch from the step generator
        and this process applies its own rows (:meth:`draw_global`), so any world size and a resumed
        run augment each image as one uninterrupted process would. They are drawn on the CPU, where
        kornia draws (the step generator lives where the draw runs), and are tiny.

        Shapes:
            views: V x (B, C, H, W) in [0, 1] -> V x (B, C, H, W) normalised.
        """
        params = self.draw_global(self._gpu_views.draw, views[0].shape[0], "cpu")
        return self._gpu_views(views, params)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self._gpu_views is not None and self._trainer is not None and self.trainer.training:
            views, labels = batch
            batch = (self.augment_views(list(views)), labels)
        return batch

    # --- forward and loss -----------------------------------------------------------------
    def forward(self, views: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Online embeddings of every view, target embeddings of the large views, and the loss.

        Shapes:
            views: n_large x (B, C, H, W) then n_small x (B, C, h, w) -> three scalars.
        """
        hp = self.hparams
        if len(views) != hp.n_large + hp.n_small:
            raise ValueError(f"expected {hp.n_large} large + {hp.n_small} small views, got {len(views)}.")
        online = by_resolution(lambda x: self.head(self.encoder(x)), views)
        with torch.no_grad():
            target = by_resolution(self.target, views[: hp.n_large])  # small crops never reach the target
        online, rows = zip(*(gather_batch(z, with_grad=True) for z in online))
        target = [gather_batch(t, with_grad=False)[0] for t in target]
        candidates = self._candidates(target[0].shape[0], target[0].device)
        return relicv2_loss(online, target, hp.temperature, hp.alpha, hp.beta, rows[0], candidates)

    def _candidates(self, n: int, device: torch.device) -> Tensor | None:
        if self.hparams.num_negatives is None:
            return None
        # Drawn for the gathered global batch from the step generator, the same on every process,
        # so all ranks score the same global draw (and a resumed run draws as the original).
        generator = self.step_generator(device) if self.training and self._trainer is not None else None
        return sample_candidates(n, self.hparams.num_negatives, generator, device)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        views, _ = batch
        loss, contrastive, invariance = self(list(views))
        self.log_step(loss, batch_size=views[0].shape[0], contrastive=contrastive, invariance=invariance,
                      ema_momentum=self.target.momentum)
        return loss

    # --- target network ---------------------------------------------------------------------
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The target follows every real optimizer step, inside the step itself, so any checkpoint
        # (also one written mid-epoch by a callback's on_train_batch_end) holds a consistent pair.
        done = self.trainer.global_step + 1  # Lightning counts this step as completed after the hook
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.target.update(nn.Sequential(self.encoder, self.head), done, total)

    def setup(self, stage: str) -> None:
        # ReLICv2's BatchNorm statistics, like its negatives, span the global batch. Converting here
        # (before the strategy wraps the model) makes it the method's default on any config;
        # Lightning's trainer.sync_batchnorm does the same and may be used instead.
        if not (self.hparams.sync_batchnorm and self.trainer.world_size > 1):
            return
        if self.trainer.strategy.root_device.type == "cpu":  # torch's SyncBatchNorm has no CPU kernel
            self.print("ReLICv2: multi-process CPU run: BatchNorm statistics stay per process.")
            return
        nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def on_fit_start(self) -> None:
        n_e, world = self.hparams.num_negatives, self.trainer.world_size
        if n_e is not None:
            global_batch = self.global_batch_size() // self.trainer.accumulate_grad_batches
            if not 1 <= n_e <= global_batch - 1:
                raise UserError(f"num_negatives={n_e} is not allowed with a global batch of {global_batch} "
                                 f"({world} process(es)): use 1 <= num_negatives <= {global_batch - 1}, or null.")


def _check_args(n_large, n_small, img_size, small_size, p_m, temperature, alpha, beta, num_negatives,
                saliency_root) -> None:
    check_multicrop(n_large, n_small, img_size, small_size, p_m)
    if temperature <= 0:
        raise UserError(f"temperature={temperature} is not allowed: use temperature > 0.")
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise UserError(f"alpha={alpha}, beta={beta} are not allowed: use alpha, beta >= 0, not both 0.")
    if num_negatives is not None and num_negatives < 1:
        raise UserError(f"num_negatives={num_negatives} is not allowed: use >= 1, or null for all.")
    if p_m > 0 and not saliency_root:
        raise UserError(f"p_m={p_m} needs saliency_root (a folder of precomputed masks).")

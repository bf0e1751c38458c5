"""Fine-tuning: the whole encoder plus a new classifier, with the MAE / "ResNet strikes back" recipes."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import DropPath
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ssl_kit.errors import UserError
from ssl_kit.evaluators.base import Evaluator
from ssl_kit.evaluators.features import extract_features, resolve_bf16
from ssl_kit.evaluators.results import format_summary, seed_summary, topk_accuracy, write_results
from ssl_kit.optim.training import OptimizerCallable, warmup_cosine, weight_decay_groups
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD


def finetune_adamw(params) -> Optimizer:
    """MAE's fine-tuning AdamW: base lr 5e-4 per 256 images (ViT-B), betas (0.9, 0.999), weight decay 0.05."""
    return torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=0.05)


def set_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth after the fact: every ``drop_path*`` sub-module of block ``i`` (of ``n``,
    in module order) becomes ``DropPath(rate * i / (n - 1))``, timm's linear rule. Returns ``n``.

    Raises:
        ValueError: ``rate > 0`` but the model has no ``drop_path`` sites (not a timm ViT/ConvNeXt/ResNet...).
    """
    sites = [(parent_name, parent, attr) for parent_name, parent in model.named_modules()
             for attr, _ in parent.named_children() if attr.startswith("drop_path")]
    blocks = list(dict.fromkeys(name for name, _, _ in sites))  # block names, in order, once each
    if rate > 0 and not blocks:
        raise UserError(f"drop_path_rate={rate}: {type(model).__name__} has no drop_path modules; use 0.")
    for name, parent, attr in sites:
        p = rate * blocks.index(name) / max(1, len(blocks) - 1)
        setattr(parent, attr, DropPath(p) if p > 0 else nn.Identity())
    return len(blocks)


def posterize_zero_safe(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives a black image (as in TF's RandAugment and
    Pillow < 13; Pillow >= 13 raises for bits=0)."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def zero_bit_posterize_safe(transform: Callable) -> Callable:
    """Make timm's (Rand/Auto)Augment posterize ops accept 0 bits, in place; returns ``transform``.

    RandAugment's magnitude noise (``mstd0.5`` around 9) reaches the maximum magnitude 10, i.e.
    "keep 0 bits", in ~2% of the Posterize applications: with Pillow >= 13 that raised inside a
    data worker and stopped fine-tuning.
    """
    for t in getattr(transform, "transforms", ()):
        ops = list(getattr(t, "ops", ())) + [op for sub in getattr(t, "policy", ()) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_zero_safe
    return transform


def with_lr_scale(build: OptimizerCallable) -> OptimizerCallable:
    """Wrap an optimizer factory so each group's lr is multiplied by its ``lr_scale`` (layer decay)."""

    def build_scaled(groups):
        optimizer = build(groups)
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        return optimizer

    return build_scaled


class FineTune(Evaluator):
    """Fine-tune an encoder end to end with a new linear classifier.

    Training views are timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment,
    random erasing); batches go through timm's Mixup/CutMix; the loss is soft-target cross-entropy
    (label smoothing folded into the mixed targets) or binary cross-entropy (``bce_loss``, the
    "ResNet strikes back" recipe). Layer-wise lr decay uses timm's block grouping (ViT: the head
    x1, block ``i`` of ``d`` (0-based) x ``layer_decay ** (d - i)``, embeddings
    x ``layer_decay ** (d + 1)``; timm puts the final norm with the last block). Drop path rises linearly over blocks. Optional weight EMA
    (timm ``ModelEmaV3``) is evaluated beside the model. ``fit`` ends by writing val top-1/top-5
    to ``<run dir>/<results_file>``; seeds are one run each (``--seed_everything S``), joined by
    ``python -m ssl_kit aggregate``.

    Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021 (end-to-end
    fine-tuning); Wightman et al., "ResNet strikes back", 2021.

    Args:
        encoder, model_name, img_size, results_file: see :class:`Evaluator`.
        drop_path_rate: stochastic depth of the last block.
        layer_decay: layer-wise lr decay factor (None: one lr for all).
        global_pool: classifier pooling given to timm's ``reset_classifier`` (``avg`` for MAE's ViT
            recipe; None keeps the encoder's).
        mixup_alpha: Mixup beta parameter (0 disables).
        cutmix_alpha: CutMix beta parameter (0 disables).
        label_smoothing: target smoothing.
        bce_loss: binary cross-entropy on (mixed) targets instead of cross-entropy.
        bce_target_thresh: binarise BCE targets above this value (RSB A1/A2: 0.2).
        auto_augment: timm auto-augment policy (``rand-m9-mstd0.5-inc1`` = RandAugment(9, 0.5)).
        re_prob: random-erasing probability.
        color_jitter: colour-jitter strength (timm disables it when RandAugment is on).
        crop_scale: RandomResizedCrop area range.
        ema_decay: weight-EMA decay (None: no EMA).
        optimizer, lr_scaling, warmup_epochs, min_lr_ratio: see :class:`SSLMethod`; LAMB is
            ``class_path: timm.optim.Lamb``.

    Examples:
        >>> ft = FineTune("runs/mae/last.ckpt", img_size=224, layer_decay=0.65, global_pool="avg")
        >>> # python -m ssl_kit fit --config eval/finetune.yaml --encoder runs/mae/last.ckpt
    """

    def __init__(
        self,
        encoder: str | None = None,
        model_name: str | None = None,
        img_size: int = 224,
        drop_path_rate: float = 0.1,
        layer_decay: float | None = 0.65,
        global_pool: str | None = None,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        bce_loss: bool = False,
        bce_target_thresh: float | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        ema_decay: float | None = None,
        results_file: str = "finetune.json",
        optimizer: OptimizerCallable = finetune_adamw,
        lr_scaling: bool = True,
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
    ) -> None:
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise UserError(f"layer_decay={layer_decay} is not allowed: use a value in (0, 1], or null to disable.")
        super().__init__(encoder, model_name, img_size, results_file, with_lr_scale(optimizer), lr_scaling,
                         warmup_epochs, min_lr_ratio)
        self.save_hyperparameters(ignore=["optimizer"])
        set_drop_path(self.encoder, drop_path_rate)
        self.mixup: Mixup | None = None
        self.criterion: nn.Module | None = None
        self.ema: ModelEmaV3 | None = None

    def train_transform(self) -> Callable:
        hp = self.hparams
        return zero_bit_posterize_safe(create_transform(
            self.img_size, is_training=True, scale=tuple(hp.crop_scale), auto_augment=hp.auto_augment,
            color_jitter=hp.color_jitter, re_prob=hp.re_prob, re_mode="pixel", interpolation="bicubic",
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        hp = self.hparams
        if self.criterion is None:  # first setup: build the head and the training machinery
            self.build_head(self.num_classes)
            if hp.mixup_alpha > 0 or hp.cutmix_alpha > 0:
                if self.trainer.datamodule.batch_size % 2:
                    raise UserError(f"Mixup/CutMix pair each image with another: data.batch_size="
                                     f"{self.trainer.datamodule.batch_size} must be even.")
                self.mixup = Mixup(hp.mixup_alpha, hp.cutmix_alpha, label_smoothing=hp.label_smoothing,
                                   num_classes=self.num_classes)
            self.criterion = self.build_criterion()
            if hp.ema_decay is not None:
                self.ema = ModelEmaV3(self.encoder, decay=hp.ema_decay)

    def build_head(self, num_classes: int) -> None:
        """A new ``num_classes`` classifier on the encoder (timm ``reset_classifier``), MAE's init."""
        pool = self.hparams.global_pool
        self.encoder.reset_classifier(num_classes, **({} if pool is None else {"global_pool": pool}))
        head = self.encoder.get_classifier()
        if isinstance(head, nn.Linear):  # tiny weights: early gradients do not wreck the features
            nn.init.trunc_normal_(head.weight, std=2e-5)
            nn.init.zeros_(head.bias)

    def build_criterion(self) -> nn.Module:
        hp = self.hparams
        if hp.bce_loss:  # mixed targets already carry the smoothing
            smoothing = 0.0 if self.mixup is not None else hp.label_smoothing
            return BinaryCrossEntropy(smoothing=smoothing, target_threshold=hp.bce_target_thresh)
        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        return nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)

    def param_groups(self) -> list[dict[str, Any]]:
        if self.hparams.layer_decay is None:
            return weight_decay_groups(self.encoder)
        groups = param_groups_layer_decay(self.encoder, weight_decay=1.0, layer_decay=self.hparams.layer_decay,
                                          no_weight_decay_list=getattr(self.encoder, "no_weight_decay", set)())
        for group in groups:  # decayed groups take the optimizer's own weight_decay
            if group["weight_decay"]:
                del group["weight_decay"]
        # Full-lr group first: the base class reports param_groups[0]'s lr as the peak.
        return sorted(groups, key=lambda g: -g["lr_scale"])

    def training_step(self, batch, batch_idx: int) -> Tensor:
        imgs, targets = batch
        if self.mixup is not None:
            imgs, targets = self.mixup(imgs, targets)  # targets: (B, num_classes) soft labels
        loss = self.criterion(self.encoder(imgs), targets)
        self.log_step(loss, batch_size=imgs.shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.encoder, step=self.global_step)

    def extract_features(self, x: Tensor) -> Tensor:
        return self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Top-1/top-5 of ``model``'s logits on the held-out split (eval transform)."""
        model.eval()
        logits, labels = extract_features(model, self.trainer.datamodule.eval_dataloader("val"), self.device)
        return topk_accuracy(logits, labels)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        seed = self.seed()
        results = {"protocol": "finetune", "encoder": self.encoder_source, "epochs": self.trainer.current_epoch,
                   "final": seed_summary({seed: self.evaluate(self.encoder)}), **getattr(self, "hparams_extra", {})}
        if self.ema is not None:
            results["ema"] = seed_summary({seed: self.evaluate(self.ema.module)})
        path = write_results(self.results_path(), results)
        for key in ("final", "ema"):
            if key in results:
                print(format_summary(f"\nfine-tuning ({key}) on the held-out split ({self.encoder_source}):", results[key]))
        print(f"results written to {path}")


def fit_finetune(
    encoder: nn.Module, train: DataLoader, val: DataLoader, num_classes: int, epochs: int = 5,
    base_lr: float = 1e-3, weight_decay: float = 0.05, layer_decay: float | None = None,
    warmup_epochs: float = 1.0, label_smoothing: float = 0.1, device: torch.device | str = "cpu",
    bf16: bool | None = None,
) -> dict[str, float]:
    """A short end-to-end fine-tune as a plain loop (no Trainer), for reports inside other runs:
    the encoder plus a new linear classifier on its pooled features, AdamW at
    ``base_lr x batch / 256`` with timm's layer-wise lr decay (as the MAE and ConvNeXt V2
    fine-tuning recipes), no decay on biases, norms and tokens, warm-up + cosine,
    label-smoothed cross-entropy; returns val top-1/top-5. ``encoder`` is trained in place.

    Args:
        encoder: a timm model with ``num_classes=0`` (its output is the pooled feature).
        train: augmented, labelled training batches.
        val: un-augmented, labelled held-out batches.
        num_classes: classifier width.
        epochs: passes over ``train``.
        base_lr: lr per 256 images.
        weight_decay: AdamW weight decay.
        layer_decay: lr factor per block away from the head (None: one lr for all).
        warmup_epochs: linear warm-up length.
        label_smoothing: cross-entropy target smoothing.
        device: where to train.
        bf16: forward passes under bf16 autocast (None: on CUDA only), weights and optimizer in fp32.
    """
    device = torch.device(device)
    bf16 = resolve_bf16(bf16, device)
    head = nn.Linear(encoder.num_features, num_classes).to(device)
    nn.init.trunc_normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    if layer_decay is None:
        groups = weight_decay_groups(nn.Sequential(encoder, head))
    else:
        groups = param_groups_layer_decay(encoder, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=getattr(encoder, "no_weight_decay", set)())
        groups += [{"params": [head.weight], "weight_decay": weight_decay}, {"params": [head.bias], "weight_decay": 0.0}]
    opt = with_lr_scale(lambda g: torch.optim.AdamW(g, lr=base_lr * train.batch_size / 256,
                                                    weight_decay=weight_decay))(groups)
    model = nn.Sequential(encoder, head).train()
    total = max(1, epochs * len(train))
    warmup = int(warmup_epochs * len(train))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total))
    for _ in range(epochs):
        for imgs, labels in train:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(imgs.to(device))
            loss = F.cross_entropy(logits.float(), labels.to(device), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    model.eval()
    logits, labels = extract_features(model, val, device, bf16)
    return topk_accuracy(logits, labels)

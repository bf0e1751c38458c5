"""The paper configs carry the papers' recipes.

Expected values are the papers', as summarised in the project's method notes
(shared/docs/methods.md); values the notes do not give are the README's Methods table. Each
config is resolved by the same parser as ``fit`` (defaults included), not read as plain YAML.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO

#: The paper configs are written for one node of 8 GPUs (``devices: auto`` resolves to them).
GPUS = 8


def resolved(config: str):
    """The config as ``python -m ssl_kit fit --config CONFIG`` resolves it (nothing instantiated)."""
    from ssl_kit.bench.job import _ParseOnlyCLI
    from ssl_kit.data import SSLDataModule
    from ssl_kit.methods import SSLMethod  # noqa: F401  (registers the methods)
    from ssl_kit.optim.training import TrainingModule  # the CLI's base: methods and evaluators

    cli = _ParseOnlyCLI(TrainingModule, SSLDataModule, subclass_mode_model=True, save_config_callback=None, run=False,
                        args=["--config", str(REPO / config), "--data.root", "/data/imagenet/train"])
    return cli.config


def global_batch(cfg) -> int:
    """data.batch_size x devices x num_nodes x accumulate_grad_batches (the lr rule's batch)."""
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else GPUS
    return cfg.data.batch_size * devices * (cfg.trainer.num_nodes or 1) * (cfg.trainer.accumulate_grad_batches or 1)


def optimizer(cfg) -> tuple[str, dict]:
    opt = cfg.model.init_args.optimizer
    return opt.class_path, dict(opt.init_args)


def test_mae_recipe():
    """MAE (He et al. 2021): ViT-B/16, mask 0.75, decoder 512 wide x 8 blocks (16 heads), norm-pix
    targets, AdamW betas (0.9, 0.95), wd 0.05, lr 1.5e-4 x batch / 256 at batch 4096, 800 epochs,
    40 warm-up, cosine decay, RandomResizedCrop(0.2-1)."""
    cfg = resolved("configs/mae.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.methods.MAE"
    assert (m.model_name, m.img_size) == ("vit_base_patch16_224", 224)
    assert m.mask_ratio == 0.75
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert m.norm_pix_loss is True and tuple(m.crop_scale) == (0.2, 1.0)
    name, kwargs = optimizer(cfg)
    assert name == "torch.optim.AdamW" and tuple(kwargs["betas"]) == (0.9, 0.95)
    assert (kwargs["lr"], kwargs["weight_decay"]) == (1.5e-4, 0.05)
    assert m.lr_scaling is True and global_batch(cfg) == 4096
    assert (cfg.trainer.max_epochs, m.warmup_epochs, m.min_lr_ratio) == (800, 40, 0.0)


def test_fcmae_recipe():
    """FCMAE (Woo et al. 2023): ConvNeXt V2, 60% of 32x32 patches removed, decoder one ConvNeXt V2
    block of width 512, norm-pix targets, AdamW lr 1.5e-4 x batch / 256 at batch 4096, wd 0.05,
    800 epochs, 40 warm-up."""
    cfg = resolved("configs/fcmae.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.methods.FCMAE"
    assert (m.model_name, m.img_size) == ("convnextv2_base", 224)  # total stride 32: 7x7 patches of 32 px
    assert m.mask_ratio == 0.6
    assert (m.decoder_embed_dim, m.decoder_depth) == (512, 1)
    assert m.norm_pix_loss is True
    name, kwargs = optimizer(cfg)
    assert name == "torch.optim.AdamW" and kwargs["lr"] == 1.5e-4 and kwargs["weight_decay"] == 0.05
    assert m.lr_scaling is True and global_batch(cfg) == 4096
    assert (cfg.trainer.max_epochs, m.warmup_epochs) == (800, 40)


def test_relicv2_recipe():
    """ReLICv2 (Tomasev et al. 2022): ResNet-50, 4 large crops of 224 px and 2 small of 96 px,
    EMA target with momentum 0.996 -> 1; README: tau 0.1, alpha = beta = 1, LARS 0.2 x batch / 256
    at batch 4096, 1000 epochs."""
    cfg = resolved("configs/relicv2.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.methods.ReLICv2"
    assert m.model_name == "resnet50"
    assert (m.n_large, m.img_size, m.n_small, m.small_size) == (4, 224, 2, 96)
    assert (m.base_momentum, m.final_momentum) == (0.996, 1.0)
    assert (m.temperature, m.alpha, m.beta) == (0.1, 1.0, 1.0)
    name, kwargs = optimizer(cfg)
    assert name == "ssl_kit.optim.LARS" and kwargs["lr"] == 0.2
    assert m.lr_scaling is True and global_batch(cfg) == 4096
    assert cfg.trainer.max_epochs == 1000


def test_eva_recipe():
    """EVA (Fang et al. 2023): a ViT student with ~40% of its patches block-masked (BEiT blocks of
    >= 16 patches), regressing a frozen OpenAI CLIP ViT-L/14 at 224 px; README: ViT-B/16 student,
    AdamW 1.5e-4 x batch / 256, 400 epochs, 40 warm-up."""
    cfg = resolved("configs/eva.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.methods.EVA"
    assert (m.model_name, m.img_size) == ("vit_base_patch16_224", 224)
    assert m.mask_ratio == 0.4 and m.min_num_patches == 16
    teacher = dict(m.teacher)
    assert (teacher["kind"], teacher["model_name"]) == ("open_clip", "ViT-L-14")
    name, kwargs = optimizer(cfg)
    assert name == "torch.optim.AdamW" and kwargs["lr"] == 1.5e-4
    assert (cfg.trainer.max_epochs, m.warmup_epochs) == (400, 40)


def test_linear_probe_recipe():
    """MAE's linear probe: LARS, lr 0.1 x batch / 256 at batch 16384, no weight decay, 90 epochs."""
    cfg = resolved("eval/linear.yaml")
    assert cfg.model.class_path == "ssl_kit.evaluators.LinearProbe"
    name, kwargs = optimizer(cfg)
    assert name == "ssl_kit.optim.LARS" and kwargs["lr"] == 0.1 and kwargs["weight_decay"] == 0.0
    assert global_batch(cfg) == 16384 and cfg.trainer.max_epochs == 90


def test_finetune_recipe():
    """MAE's ViT-B fine-tuning: AdamW, layer decay 0.65, drop path 0.1, mixup 0.8, cutmix 1.0,
    label smoothing 0.1, RandAugment(9, 0.5), random erasing 0.25, 100 epochs, average pooling."""
    cfg = resolved("eval/finetune.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.evaluators.FineTune"
    assert optimizer(cfg)[0] == "torch.optim.AdamW"
    assert (m.layer_decay, m.drop_path_rate, m.global_pool) == (0.65, 0.1, "avg")
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing) == (0.8, 1.0, 0.1)
    assert m.auto_augment.startswith("rand-m9-mstd0.5") and m.re_prob == 0.25
    assert cfg.trainer.max_epochs == 100


def test_knn_protocol():
    """DINO's k-NN: k = 20 among the reported values, T = 0.07."""
    cfg = yaml.safe_load((REPO / "eval/knn.yaml").read_text())
    assert 20 in cfg["k"] and cfg["temperature"] == 0.07


@pytest.mark.parametrize("config", ["configs/mae.yaml", "configs/fcmae.yaml", "configs/relicv2.yaml",
                                    "configs/eva.yaml"])
def test_paper_configs_use_the_scaled_lr_and_a_cosine_to_zero(config):
    m = resolved(config).model.init_args
    assert m.lr_scaling is True and m.min_lr_ratio == 0.0

"""Fine-tuning: layer-wise lr decay scales, drop-path schedule, a two-step run, seed aggregation."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import pytorch_lightning as pl
import timm
import torch

from ssl_kit.data import SSLDataModule
from ssl_kit.evaluators.finetune import FineTune, set_drop_path
from ssl_kit.evaluators.results import aggregate, write_results

DEPTH = 3


def tiny_load_encoder(source: str, arch: str | None = None, img_size: int | None = None) -> torch.nn.Module:
    """Test stand-in for ``load_encoder`` on timm names: a 3-block ViT-Tiny at patch 4."""
    return timm.create_model(source, num_classes=0, img_size=img_size or 32, patch_size=4, depth=DEPTH)


@pytest.fixture
def tiny_loader(monkeypatch):
    module = types.ModuleType("ssl_kit.evaluators.load")
    module.load_encoder = tiny_load_encoder
    monkeypatch.setitem(sys.modules, "ssl_kit.evaluators.load", module)


def expected_layer(name: str) -> int:
    """Layer ids: embeddings 0, block i -> i + 1, head DEPTH + 1 (as in MAE / BEiT); timm groups the
    final norm with the last block."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH if name.startswith("norm.") else DEPTH + 1


def test_layer_decay_gives_each_block_its_scale(tiny_loader):
    ft = FineTune("vit_tiny_patch16_224", img_size=32, layer_decay=0.5)
    ft.build_head(7)
    scale = {id(p): g["lr_scale"] for g in ft.param_groups() for p in g["params"]}
    decay = {id(p): g.get("weight_decay", "optimizer") for g in ft.param_groups() for p in g["params"]}
    names = dict(ft.encoder.named_parameters())
    assert set(scale) == {id(p) for p in names.values()}  # every trainable parameter, once
    for name, p in names.items():
        assert scale[id(p)] == pytest.approx(0.5 ** (DEPTH + 1 - expected_layer(name))), name
        no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
        assert decay[id(p)] == (0.0 if no_decay else "optimizer"), name
    assert ft.param_groups()[0]["lr_scale"] == 1.0  # the head's group first: reported as the peak lr


def test_drop_path_rises_linearly_over_blocks():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4, depth=DEPTH)
    assert set_drop_path(vit, 0.2) == DEPTH
    rates = [[getattr(b, a).drop_prob if hasattr(getattr(b, a), "drop_prob") else 0.0 for a in ("drop_path1", "drop_path2")]
             for b in vit.blocks]
    assert rates == [[0.0, 0.0], [0.1, 0.1], [0.2, 0.2]]
    with pytest.raises(ValueError, match="no drop_path modules"):
        set_drop_path(torch.nn.Linear(2, 2), 0.1)


def test_two_step_finetune_with_mixup_ema_and_layer_decay(tiny_loader, tmp_path):
    torch.manual_seed(0)
    ft = FineTune("vit_tiny_patch16_224", img_size=32, layer_decay=0.65, drop_path_rate=0.1, ema_decay=0.5,
                  warmup_epochs=0.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    before = {k: v.clone() for k, v in ft.encoder.state_dict().items()}
    dm = SSLDataModule("synthetic", synthetic_size=20, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1)
    trainer.fit(ft, datamodule=dm)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    for group, peak in zip(trainer.optimizers[0].param_groups, scheduler.base_lrs):
        assert peak == pytest.approx(5e-4 * 4 / 256 * group["lr_scale"])  # base lr x B/256 x layer scale
    after = ft.encoder.state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert ft.encoder.get_classifier().out_features == 4
    ema = ft.ema.module.state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(ema, after["blocks.0.attn.qkv.weight"])
    assert not torch.equal(ema, before["blocks.0.attn.qkv.weight"])
    results = json.loads((tmp_path / "finetune.json").read_text())
    assert set(results) >= {"final", "ema"} and 0.0 <= results["final"]["top1"]["mean"] <= 100.0


def test_aggregate_reports_mean_and_sample_std(tmp_path, capsys):
    for seed, top1 in ((0, 80.0), (1, 81.0), (2, 82.5)):
        write_results(tmp_path / f"seed{seed}" / "finetune.json",
                      {"final": {"per_seed": {str(seed): {"top1": top1, "top5": 95.0}}}})
    summary = aggregate(str(tmp_path))
    mean = (80.0 + 81.0 + 82.5) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in (80.0, 81.0, 82.5)) / 2)
    assert summary["top1"] == pytest.approx({"mean": mean, "std": std, "n": 3})
    assert summary["top5"]["std"] == 0.0 and "81.17 ± 1.26" in capsys.readouterr().out
    assert json.loads((tmp_path / "seeds.json").read_text())["final"]["top1"]["n"] == 3
    write_results(tmp_path / "again" / "finetune.json", {"final": {"per_seed": {"0": {"top1": 1.0, "top5": 1.0}}}})
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        aggregate(str(tmp_path))

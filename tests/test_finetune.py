"""Fine-tuning: layer-wise lr decay scales, drop-path schedule, a two-step run, seed aggregation."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch

from ssl_kit.data import SSLDataModule
from ssl_kit.evaluators.finetune import FineTune, fit_finetune, set_drop_path
from ssl_kit.evaluators.results import aggregate, write_results

DEPTH = 3


def tiny_load_encoder(source: str, model_name: str | None = None, img_size: int | None = None) -> torch.nn.Module:
    """Test stand-in for ``load_encoder`` on timm names: a 3-block ViT-Tiny at patch 4."""
    return timm.create_model(source, num_classes=0, img_size=img_size or 32, patch_size=4, depth=DEPTH)


@pytest.fixture
def tiny_loader(monkeypatch):
    monkeypatch.setattr("ssl_kit.checkpoints.load.load_encoder", tiny_load_encoder)


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


class Recorder(pl.Callback):
    """Per training step: the batch as loaded, what the encoder trained on, the loss targets and
    the encoder weights after the optimizer step; the weights the run started from."""

    def __init__(self) -> None:
        self.batches, self.inputs, self.targets, self.weights = [], [], [], []

    def on_train_start(self, trainer, ft) -> None:
        self.start = {k: v.detach().clone() for k, v in ft.encoder.state_dict().items()}
        ft.encoder.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].clone()) if m.training else None)
        ft.criterion.register_forward_pre_hook(lambda m, a: self.targets.append(a[1].clone()))

    def on_train_batch_start(self, trainer, ft, batch, batch_idx) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))  # Mixup works in place

    def on_train_batch_end(self, trainer, ft, outputs, batch, batch_idx) -> None:
        # Callbacks run before the module's own on_train_batch_end, where the EMA updates.
        self.weights.append({k: v.detach().clone() for k, v in ft.encoder.state_dict().items()})


def assert_mixed(x, y, inputs, targets, num_classes: int, smoothing: float) -> None:
    """``inputs``/``targets`` are timm's batch Mixup or CutMix of ``(x, y)`` with the flipped batch,
    one lambda for both, and smoothed labels."""
    off = smoothing / num_classes
    one_hot = lambda labels: torch.nn.functional.one_hot(labels, num_classes) * (1 - smoothing) + off  # noqa: E731
    differ = (y != y.flip(0)).nonzero().flatten()  # rows whose partner has another class show lambda
    lam_targets = (targets[differ[0], y[differ[0]]].item() - off) / (1 - smoothing) if len(differ) else None
    xf = x.flip(0)
    from_x, from_flip = (inputs == x).all(1), (inputs == xf).all(1)  # (B, H, W) per pixel
    if bool((from_x | from_flip).all()):  # CutMix: one box, the same in every image, from the partner
        rows, cols = (from_flip & ~from_x).any(0).nonzero().unbind(1)  # pixels only the partner explains
        box = torch.zeros_like(from_x[0])
        if len(rows):
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        torch.testing.assert_close(inputs, torch.where(box, xf, x))
        lam = 1.0 - box.float().mean().item()  # the box seen may be smaller where partners agree
        if lam_targets is not None:
            assert lam_targets <= lam + 1e-6, (lam_targets, lam)
            lam = lam_targets
    else:  # Mixup: a convex combination of the two images
        diff = x - xf
        lam = ((inputs - xf) * diff).sum().item() / (diff * diff).sum().item()
        torch.testing.assert_close(inputs, lam * x + (1 - lam) * xf)
        assert lam_targets is None or abs(lam - lam_targets) < 1e-4, (lam_targets, lam)
    assert 0.0 < lam < 1.0, lam
    torch.testing.assert_close(targets, lam * one_hot(y) + (1 - lam) * one_hot(y.flip(0)))


def test_finetune_mixes_batches_follows_the_ema_recursion_and_reports_top1(tiny_loader, tmp_path, monkeypatch):
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    calls = {RandAugment: 0, RandomErasing: 0}
    for cls in calls:  # count the training views that went through RandAugment and random erasing
        monkeypatch.setattr(cls, "__call__", (lambda call, cls: lambda self, img: (
            calls.__setitem__(cls, calls[cls] + 1), call(self, img))[1])(cls.__call__, cls))
    evaluated = []
    evaluate = FineTune.evaluate
    monkeypatch.setattr(FineTune, "evaluate", lambda self, model: evaluated.append(model) or evaluate(self, model))

    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lambda and Mixup-or-CutMix from NumPy
    decay, steps = 0.7, 3
    ft = FineTune("vit_tiny_patch16_224", img_size=32, layer_decay=0.65, drop_path_rate=0.1, ema_decay=decay,
                  warmup_epochs=0.0, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    dm = SSLDataModule("synthetic", synthetic_size=40, batch_size=4, num_workers=0)
    recorder = Recorder()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                         callbacks=[recorder])
    trainer.fit(ft, datamodule=dm)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    for group, peak in zip(trainer.optimizers[0].param_groups, scheduler.base_lrs):
        assert peak == pytest.approx(5e-4 * 4 / 256 * group["lr_scale"])  # base lr x B/256 x layer scale
    assert ft.encoder.get_classifier().out_features == 4

    # Every training image went through RandAugment and random erasing; every batch was mixed.
    assert calls[RandAugment] >= 4 * steps and calls[RandomErasing] >= 4 * steps, calls
    assert len(recorder.inputs) == len(recorder.targets) == steps
    for (x, y), inputs, targets in zip(recorder.batches, recorder.inputs, recorder.targets):
        assert_mixed(x, y, inputs, targets, num_classes=4, smoothing=0.1)

    # EMA: timm's ModelEmaV3 starts from the first step's weights, then e = d e + (1 - d) w.
    ema = recorder.start
    for step, weights in enumerate(recorder.weights, start=1):
        d = 0.0 if step == 1 else decay
        ema = {k: d * ema[k] + (1 - d) * w if w.is_floating_point() else w for k, w in weights.items()}
    for k, v in ft.ema.module.state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=1e-6, msg=k)
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], recorder.weights[-1]["blocks.0.attn.qkv.weight"])

    # The reported top-1 is the val accuracy of the fine-tuned encoder and of its EMA.
    assert evaluated == [ft.encoder, ft.ema.module]
    results = json.loads((tmp_path / "finetune.json").read_text())
    for key, model in (("final", ft.encoder), ("ema", ft.ema.module)):
        model.eval()
        with torch.no_grad():
            pairs = [(model(x).argmax(1), y) for x, y in dm.eval_dataloader("val")]
        top1 = 100.0 * torch.cat([p == y for p, y in pairs]).float().mean().item()
        assert results[key]["top1"]["mean"] == pytest.approx(top1), key
        assert results[key]["per_seed"]["0"]["top1"] == pytest.approx(top1), key


def test_finetune_views_apply_randaugment_and_random_erasing(tiny_loader):
    """The training transform carries RandAugment(2 ops, magnitude 9, std 0.5, p 0.5) and random
    erasing at re_prob, and both change images at their rates (binomial bounds at n = 400)."""
    import copy
    import random

    from PIL import Image
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    ft = FineTune("vit_tiny_patch16_224", img_size=32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    transform = ft.train_transform()
    by_type = {type(t): t for t in transform.transforms}
    ra, erase = by_type[RandAugment], by_type[RandomErasing]
    assert ra.num_layers == 2 and {(op.magnitude, op.magnitude_std, op.prob) for op in ra.ops} == {(9, 0.5, 0.5)}
    assert erase.probability == 0.25 and erase.mode == "pixel"
    # The magnitude noise reaches the maximum, 10, where Posterize keeps 0 bits: a black image
    # (Pillow >= 13 raises for bits=0, which stopped fine-tuning in a data worker).
    posterize = copy.copy(next(op for op in ra.ops if op.name == "PosterizeIncreasing"))
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0.0, 1.0
    assert posterize(Image.new("RGB", (8, 8), (200, 100, 50))).getextrema() == ((0, 0),) * 3

    random.seed(0)
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy())
    n, ra_changed, erased = 400, 0, 0
    for _ in range(n):
        ra_changed += ra(img).tobytes() != img.tobytes()
        x = torch.randn(3, 32, 32, generator=rng) * 0.01 + 5.0  # erasing fills with N(0, 1) noise
        erased += bool((erase(x.clone()) != x).any())
    assert abs(erased / n - 0.25) <= 4.5 * math.sqrt(0.25 * 0.75 / n), erased
    assert 0.5 <= ra_changed / n <= 0.85, ra_changed  # no op at all: 0.5 x 0.5; a few ops can be no-ops


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


@pytest.mark.parametrize("bf16, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_fit_finetune_runs_forwards_at_the_asked_precision_and_keeps_fp32_weights(bf16, dtype):
    """``bf16=True`` (a bf16-mixed run's report): every forward, training and held-out, under
    bf16 autocast; the weights and optimizer stay fp32, and the weights move."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, depth=1,
                                embed_dim=32, num_heads=2)
    before = encoder.blocks[0].mlp.fc1.weight.detach().clone()
    seen = []
    encoder.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 2)
    result = fit_finetune(encoder, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), num_classes=2,
                          epochs=1, base_lr=1e-2, bf16=bf16)
    assert set(seen) == {dtype} and len(seen) == 4  # 2 training steps + 2 held-out batches
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert not torch.equal(encoder.blocks[0].mlp.fc1.weight, before)
    assert 0 <= result["top1"] <= 100

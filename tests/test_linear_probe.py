"""Linear probe: LARS arithmetic, separable data, cached == uncached, seeds, bad data, the CLI path."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from PIL import Image

from conftest import REPO, assert_ok, run_cli
from ssl_kit.data import SSLDataModule
from ssl_kit.evaluators.base import check_classification_data
from ssl_kit.evaluators.linear import LinearProbe, SeededBatches, fit_linear_probe, unshard
from ssl_kit.optim import LARS

def tiny_load_encoder(source: str, model_name: str | None = None, img_size: int | None = None) -> torch.nn.Module:
    """Test stand-in for ``load_encoder`` on timm names: a 2-block ViT-Tiny at patch 4."""
    return timm.create_model(source, num_classes=0, img_size=img_size or 32, patch_size=4, depth=2)


@pytest.fixture
def tiny_loader(monkeypatch):
    monkeypatch.setattr("ssl_kit.checkpoints.load.load_encoder", tiny_load_encoder)


def _trainer(root, epochs: int = 3) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), accelerator="cpu", devices=1)


def test_lars_matches_hand_computed_two_steps():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([w, b], lr=2.0, momentum=0.5, weight_decay=0.1, trust_coefficient=0.01)
    g = torch.tensor([[0.3, 0.0]])
    for _ in range(2):
        w.grad, b.grad = g.clone(), torch.tensor([0.5])
        opt.step()
    # step 1: u = g + 0.1 w = [0.6, 0.4], ||u|| = sqrt(0.52); ratio = 0.01 * 5 / sqrt(0.52)
    u1 = torch.tensor([[0.6, 0.4]]) * (0.05 / 0.52**0.5)
    w1 = torch.tensor([[3.0, 4.0]]) - 2.0 * u1
    u2 = (g + 0.1 * w1) * (0.01 * w1.norm() / (g + 0.1 * w1).norm())
    w2 = w1 - 2.0 * (0.5 * u1 + u2)
    torch.testing.assert_close(w.detach(), w2)
    # the bias is plain momentum SGD without weight decay: 1 - 2*0.5, then - 2*(0.5*0.5 + 0.5)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 1.0 - 1.5]))


def test_lars_zero_weights_step_as_sgd():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.5, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.5))


def test_probe_reaches_100_percent_on_separable_features():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(320) % 4
    x = means[y] + torch.randn(320, 16, generator=g)
    result = fit_linear_probe((x[:256], y[:256]), (x[256:], y[256:]), epochs=30, batch_size=64, base_lr=50.0,
                              warmup_epochs=2)
    assert result["top1"] == 100.0


def test_seeded_batches_differ_per_seed_and_split_ranks():
    a = list(SeededBatches(12, 3, seeds=[0, 1]))
    assert len(a) == 4 and a[0].shape == (2, 3)
    order = torch.cat(a, dim=1)  # (2, 12)
    assert sorted(order[0].tolist()) == list(range(12)) and not torch.equal(order[0], order[1])
    ranks = [torch.cat(list(SeededBatches(12, 3, seeds=[0], rank=r, world_size=2)), 1) for r in (0, 1)]
    assert sorted(torch.cat(ranks, 1).flatten().tolist()) == list(range(12))  # disjoint shares cover all


def test_unshard_restores_single_process_order():
    full = torch.arange(10 * 3).view(10, 3)
    world, rows = 4, 3  # shares of 3, 3, 2, 2 items, padded to 3
    shares = [torch.nn.functional.pad(full[r::world], (0, 0, 0, rows - len(full[r::world]))) for r in range(world)]
    assert torch.equal(unshard(torch.stack(shares), 10), full)


def _fit_probe(root, cache: bool) -> LinearProbe:
    torch.manual_seed(0)
    probe = LinearProbe("vit_tiny_patch16_224", img_size=32, cache_features=cache, seeds=(0, 1), augment=False,
                        warmup_epochs=1)
    # batch = the whole training split: every epoch is one full-batch step, so data order cannot differ.
    dm = SSLDataModule("synthetic", synthetic_size=40, batch_size=32, num_workers=0, val_fraction=0.2)
    _trainer(root).fit(probe, datamodule=dm)
    return probe


def test_cached_and_uncached_probes_agree(tiny_loader, tmp_path):
    cached, uncached = _fit_probe(tmp_path / "c", True), _fit_probe(tmp_path / "u", False)
    for a, b in zip(cached.heads.state_dict().values(), uncached.heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    res_c = json.loads((tmp_path / "c" / "linear.json").read_text())["final"]
    res_u = json.loads((tmp_path / "u" / "linear.json").read_text())["final"]
    assert res_c == res_u
    assert set(res_c["per_seed"]) == {"0", "1"} and res_c["top1"]["n"] == 2
    assert res_c["top1"]["mean"] == pytest.approx(np.mean([m["top1"] for m in res_c["per_seed"].values()]))
    # two seeds: two different heads
    assert not torch.equal(cached.heads[0][1].weight, cached.heads[1][1].weight)
    # the encoder is frozen and left out of the checkpoint
    assert all(not p.requires_grad for p in cached.encoder.parameters())


def _write_images(root, names):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i % 255, np.uint8)).save(path)


def test_unlabelled_data_fails_before_training(tiny_loader, tmp_path):
    _write_images(tmp_path / "flat", [f"{i}.png" for i in range(6)])
    probe = LinearProbe("vit_tiny_patch16_224", img_size=32)
    dm = SSLDataModule("folder", root=str(tmp_path / "flat"), batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="needs labelled images.*class sub-folder"):
        _trainer(tmp_path).fit(probe, datamodule=dm)


def test_train_and_val_class_lists_must_match(tmp_path):
    _write_images(tmp_path / "train", [f"{c}/{i}.png" for c in "abc" for i in range(2)])
    _write_images(tmp_path / "val", [f"{c}/{i}.png" for c in "ab" for i in range(2)])
    dm = SSLDataModule("folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), num_workers=0)
    with pytest.raises(ValueError, match=r"class lists differ.*lacks \['c'\]"):
        check_classification_data(dm)
    _write_images(tmp_path / "val", ["c/0.png"])
    dm = SSLDataModule("folder", root=str(tmp_path / "train"), val_root=str(tmp_path / "val"), num_workers=0)
    assert check_classification_data(dm) == 3


def test_encoder_flag_is_refused_by_pretraining_configs(capsys):
    from ssl_kit.cli import main

    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(REPO / "configs/demo/mae.yaml"), "--encoder", "vit_tiny_patch16_224",
              "--trainer.default_root_dir", "/nonexistent/never-created"])
    assert error.value.code == 2 and "--encoder applies to evaluation configs" in capsys.readouterr().err


@pytest.mark.slow
def test_linear_probe_cli_with_a_timm_name(tmp_path):
    args = ["fit", "--config", "eval/linear.yaml", "--encoder", "vit_tiny_patch16_224",
            "--model.init_args.img_size", "32", "--model.init_args.cache_features", "true",
            "--model.init_args.seeds", "[0, 1]", "--model.init_args.warmup_epochs", "1",
            "--data.dataset", "synthetic", "--data.synthetic_size", "48", "--data.batch_size", "16",
            "--data.eval_batch_size", "16", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
            "--trainer.max_epochs", "2", "--checkpoint.every_n_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path / "run")]
    proc = run_cli(*args)
    assert_ok(proc)
    results = json.loads((tmp_path / "run" / "linear.json").read_text())
    assert results["encoder"] == "vit_tiny_patch16_224" and results["global_batch_size"] == 16
    assert set(results["final"]["per_seed"]) == {"0", "1"} and "std" in results["final"]["top1"]
    assert "top1" in proc.stdout
    ckpt = torch.load(sorted((tmp_path / "run").glob("*.ckpt"))[-1], map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("encoder.") for k in ckpt["state_dict"])  # heads only


def test_eval_report_adds_linear_probe_for_both_encoders(tiny_mae, tmp_path, monkeypatch):
    """Both rows are measured, on the trained encoder and on a seeded random init of the same
    architecture (never the trained weights again)."""
    from ssl_kit.callbacks import EvalReport

    seen = []  # the encoder behind each frozen-feature row (pixels have none)
    scores = EvalReport.frozen_scores
    monkeypatch.setattr(EvalReport, "frozen_scores", lambda self, encode, module, dm, bf16=None: seen.append(
        {k: v.detach().clone() for k, v in encode.__self__.encoder.state_dict().items()}
        if hasattr(getattr(encode, "__self__", None), "encoder") else None) or scores(self, encode, module, dm, bf16))
    initial = {k: v.detach().clone() for k, v in tiny_mae.encoder.state_dict().items()}
    dm = SSLDataModule("synthetic", synthetic_size=20, batch_size=8, eval_batch_size=20, num_workers=0)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), accelerator="cpu", devices=1,
                         callbacks=[EvalReport(k=3, linear_epochs=3, linear_batch_size=8, seed=5)])
    trainer.fit(tiny_mae, datamodule=dm)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["protocol"]["linear"]["epochs"] == 3
    assert report["protocol"]["precision"] == "fp32"  # a 32-true run on the CPU encodes in fp32
    assert set(report["seconds"]) == {"random_init_build", "pretrained", "random_init", "pixels"}
    assert all(t >= 0 for t in report["seconds"].values())
    for encoder in ("pretrained", "random_init"):
        assert set(report[encoder]) == {"knn", "linear"} and 0 <= report[encoder]["linear"]["top1"] <= 100

    pretrained, baseline, pixels = seen
    assert pixels is None
    trained = tiny_mae.encoder.state_dict()
    assert all(torch.equal(pretrained[k], v) for k, v in trained.items())
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        fresh = tiny_mae.build_encoder().state_dict()
    assert all(torch.equal(baseline[k], v) for k, v in fresh.items())  # the seeded random init
    learned = [k for k, v in tiny_mae.encoder.named_parameters() if v.requires_grad]
    assert all(not torch.equal(baseline[k], trained[k]) for k in learned), "the baseline reused trained weights"

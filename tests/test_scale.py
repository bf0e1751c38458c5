"""Scale-out: DDP parity with one process, lr scaling by the true global batch, step-seeded
masks, precision choice, speed options, the FSDP config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY_MAE, assert_ok
from ssl_kit.callbacks import SpeedUp
from ssl_kit.callbacks.speed import auto_precision, compile_blocks, fuse_adam

# Records, per rank, the step-1 loss, the lr it used and the global batch; rank 0 also saves
# the weights before and after the step.
PROBE = '''
import json, os, torch
import pytorch_lightning as pl

class LossProbe(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(dict(pl_module.state_dict()), os.path.join(trainer.default_root_dir, "init.pt"))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = dict(loss=float(outputs["loss"]), lr=self.lr, world=trainer.world_size,
                      local_batch=int(batch[0][0].shape[0]), precision=str(trainer.precision),
                      global_batch=pl_module.hparams_extra["global_batch_size"])
        root = trainer.default_root_dir
        with open(os.path.join(root, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)
        if trainer.is_global_zero:
            torch.save(dict(pl_module.state_dict()), os.path.join(root, "after.pt"))
'''


def _write_run_inputs(tmp_path, n_images: int):
    """Distinct random images (so a sample paired with another sample's mask, or a rank training
    on the wrong shard, changes the loss), the probe module and a tiny-MAE SGD config."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "loss_probe.py").write_text(PROBE)
    model_args = "\n".join(f"    {k}: {v}" for k, v in TINY_MAE.items())
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent("""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          precision: 32-true   # pinned: bf16 rounding would differ with the batch split
          max_steps: 1
          max_epochs: 1
          enable_progress_bar: false
          enable_model_summary: false
          logger: false
          callbacks: [{class_path: loss_probe.LossProbe}]
        model:
          class_path: ssl_kit.methods.MAE
          init_args:
        """) + model_args + textwrap.dedent(f"""
            crop_scale: [1.0, 1.0]
            optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 1.0}}}}
        data:
          dataset: folder
          root: {tmp_path / 'images'}
          val_fraction: 0.0
          num_workers: 0
        """))
    return tmp_path / "cfg.yaml"


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_with_same_global_batch(tmp_path, monkeypatch):
    b = 2
    cfg = _write_run_inputs(tmp_path, n_images=2 * b)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "ssl_kit", "fit", "--config", str(cfg), "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--data.batch_size", str(b), "--trainer.default_root_dir", str(tmp_path / "two")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert_ok(two)

    from ssl_kit.cli import main

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after: seed_everything writes it
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess ran with 1 thread too; contended OpenMP threads crawl
    try:
        main(["fit", "--config", str(cfg), "--trainer.devices", "1", "--data.batch_size", str(2 * b),
              "--trainer.default_root_dir", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)

    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    # lr scaling uses the true global batch: 2 processes x 2 images = 4 = 1 process x 4 images.
    for rec in ranks:
        assert rec["world"] == 2 and rec["local_batch"] == b and rec["global_batch"] == 2 * b
        assert rec["lr"] == pytest.approx(1.0 * 2 * b / 256)
    assert one["global_batch"] == 2 * b and one["lr"] == pytest.approx(ranks[0]["lr"])
    assert f"global batch {2 * b} -> lr 0.0156" in two.stdout
    assert one["precision"] == "32-true"

    # Distinct images: each rank trains its own shard with the masks its samples get in the
    # one-process batch, so the mean of the ranks' losses is the one-process loss.
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=1e-4)
    assert one["loss"] == pytest.approx((ranks[0]["loss"] + ranks[1]["loss"]) / 2, rel=1e-5)

    # SGD: the step is -lr x the all-reduced gradient, so equal updates mean equal gradients.
    init_one, init_two = (torch.load(tmp_path / d / "init.pt") for d in ("one", "two"))
    after_one, after_two = (torch.load(tmp_path / d / "after.pt") for d in ("one", "two"))
    moved = 0
    for name, w0 in init_one.items():
        torch.testing.assert_close(init_two[name], w0)
        update_one, update_two = after_one[name] - w0, after_two[name] - w0
        # atol: an update is a difference of two rounded weights, so it is known only to the
        # weight's ulp (1.5e-8 at |w| ~ 0.2), far below the 1e-4 x largest-update bound used here;
        # a wrong shard or mask changes updates by about their own size.
        scale = float(update_one.abs().max())
        torch.testing.assert_close(update_two, update_one, rtol=1e-4, atol=1e-4 * scale + 1e-12, msg=name)
        moved += int(update_one.abs().max() > 0)
    assert moved > 10


def test_lr_rule_uses_batch_devices_nodes_and_accumulation(tiny_mae, monkeypatch, capsys):
    """README: global batch = data.batch_size x devices x num_nodes x accumulate_grad_batches,
    lr = base lr x global batch / 256, printed and logged. A real (not launched) Trainer for
    2 devices x 3 nodes x accumulation 4 with batch 5: global batch 120."""
    import pytorch_lightning as pl

    from ssl_kit.data import SSLDataModule

    trainer = pl.Trainer(accelerator="cpu", devices=2, num_nodes=3, strategy="ddp", accumulate_grad_batches=4,
                         max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer._data_connector.attach_datamodule(tiny_mae, datamodule=SSLDataModule("synthetic", batch_size=5))
    monkeypatch.setattr(pl.Trainer, "estimated_stepping_batches", property(lambda self: 100))
    tiny_mae.trainer = trainer
    optimizer = tiny_mae.configure_optimizers()["optimizer"]
    assert tiny_mae.hparams_extra["global_batch_size"] == 5 * 2 * 3 * 4
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1.5e-4 * 120 / 256] * 2)
    assert tiny_mae.hparams_extra["peak_lr"] == pytest.approx(1.5e-4 * 120 / 256)
    assert "global batch 120 -> lr 7.03e-05" in capsys.readouterr().out


def _fake_trainer(world=1, rank=0, step=0, batch_idx=0, accumulate=1, precision="32-true"):
    return SimpleNamespace(
        world_size=world, global_rank=rank, global_step=step, accumulate_grad_batches=accumulate, precision=precision,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=batch_idx)),
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


def test_masks_depend_on_step_and_global_position_only(tiny_mae, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    tiny_mae.train()

    def masks(**kw):
        tiny_mae._trainer = _fake_trainer(**kw)
        return tiny_mae.draw_masks(4 // kw.get("world", 1), 0.75, torch.device("cpu"))

    whole = masks(world=1, step=3)
    halves = [masks(world=2, rank=r, step=3) for r in range(2)]
    for full, part0, part1 in zip(whole, *halves):
        assert torch.equal(full, torch.cat([part0, part1]))
    torch.manual_seed(123)  # global RNG history must not matter (exact resume)
    assert all(torch.equal(a, b) for a, b in zip(whole, masks(world=1, step=3)))
    assert not torch.equal(whole[1], masks(world=1, step=4)[1])
    assert not torch.equal(whole[1], masks(world=1, step=3, batch_idx=1, accumulate=2)[1])  # 2nd micro-batch
    assert whole[1].sum(1).tolist() == [48.0] * 4  # 75% of 64 patches removed in every row


def test_auto_precision(monkeypatch):
    from ssl_kit.callbacks import speed

    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    assert auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_precision("auto") == "32-true"
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    assert auto_precision("auto") == auto_precision("cpu") == "bf16-mixed"  # a CPU with bf16 instructions
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert auto_precision("auto") == auto_precision("gpu") == "bf16-mixed"
    assert auto_precision("cpu") == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert auto_precision("auto") == "32-true"


def test_native_bf16_detection_follows_the_cpu_flags():
    """The check reads torch's CPU capability probes, never assumes: on this machine it must agree
    with /proc/cpuinfo's avx512_bf16 / amx_tile flags."""
    from ssl_kit.callbacks.speed import cpu_has_native_bf16

    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile", "amx_bf16"} & flags)


def test_bf16_cpu_training_tracks_fp32(tiny_mae):
    """bf16-mixed on the CPU is a speed choice, not a different model: over a short run from the
    same weights and masks its losses stay within 2% of fp32's (measured: 0.09% at most)."""
    import copy

    torch.manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32)
    losses = {}
    for bf16 in (False, True):
        model = copy.deepcopy(tiny_mae)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        run = []
        for _ in range(6):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = model(imgs)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses[bf16] = torch.tensor(run)
    assert losses[False][-1] < losses[False][0]  # it trains
    assert torch.allclose(losses[True], losses[False], rtol=0.02), losses


def test_fp16_warns_for_mae_but_not_bf16(tiny_mae, recwarn):
    SpeedUp().setup(_fake_trainer(precision="bf16-mixed"), tiny_mae, "fit")
    assert not [w for w in recwarn if "fp16" in str(w.message)]
    with pytest.warns(UserWarning, match="use bf16-mixed"):
        SpeedUp().setup(_fake_trainer(precision="16-mixed"), tiny_mae, "fit")


def test_fused_adamw_rebuild_keeps_groups_and_matches_unfused_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    make = lambda ps: torch.optim.AdamW([{"params": [ps[0]]}, {"params": [ps[1]], "weight_decay": 0.0}],
                                        lr=0.1, betas=(0.9, 0.95), weight_decay=0.05)
    plain, fused = make(params), fuse_adam(make(copies), device_type="cpu")
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    assert fuse_adam(plain) is plain  # CPU parameters: left alone when fusing for CUDA
    for _ in range(2):
        for p, q in zip(params, copies):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        plain.step()
        fused.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q)


def test_compile_blocks_in_place_keeps_state_dict_keys(tiny_mae, monkeypatch):
    """Each repeated block is really compiled (its calls go through TorchDynamo), in place."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    # The eager backend: Dynamo traces each block but runs it without Inductor's C++ build (CPU time).
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "eager"}))
    torch._dynamo.reset()
    counters.clear()
    keys = list(tiny_mae.state_dict())
    names = compile_blocks(tiny_mae)
    assert names == [f"encoder.blocks.{i}" for i in range(12)] + ["decoder.blocks.0"]
    assert list(tiny_mae.state_dict()) == keys
    modules = dict(tiny_mae.named_modules())
    assert all(modules[n]._compiled_call_impl is not None for n in names)
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for n, m in modules.items() if n not in names)
    with torch.no_grad():
        tiny_mae.eval()(torch.randn(2, 3, 32, 32))
    assert counters["stats"]["unique_graphs"] >= 2  # encoder and decoder blocks were traced
    torch._dynamo.reset()
    convnet = torch.nn.Module()
    convnet.encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    assert compile_blocks(convnet) == ["encoder"]


def test_fsdp_config_resolves_to_block_wrapping(tmp_path):
    from jsonargparse import Namespace
    from pytorch_lightning.cli import LightningArgumentParser
    from pytorch_lightning.strategies import FSDPStrategy, Strategy
    from timm.models.vision_transformer import Block

    from ssl_kit.bench.job import _ParseOnlyCLI
    from ssl_kit.data import SSLDataModule
    from ssl_kit.methods import SSLMethod

    cli = _ParseOnlyCLI(
        SSLMethod, SSLDataModule, subclass_mode_model=True, save_config_callback=None, run=False,
        args=["--config", str(REPO / "configs/mae.yaml"), "--config", str(REPO / "configs/fsdp_vit.yaml"),
              "--data.root", str(tmp_path)],
    )
    assert cli.config.model.init_args.model_name == "vit_base_patch16_224"
    parser = LightningArgumentParser()
    parser.add_subclass_arguments(Strategy, "strategy")
    strategy = parser.instantiate_classes(Namespace(strategy=cli.config.trainer.strategy)).strategy
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"


def test_weight_decay_groups_survive_fsdp_flattening(tiny_mae):
    """No callback needed: the training base records each parameter's ndim in configure_model,
    which Lightning calls before the strategy wraps the model."""
    before = [[id(p) for p in g["params"]] for g in tiny_mae.param_groups()]
    tiny_mae.configure_model()
    with torch.no_grad():
        for p in tiny_mae.parameters():  # what FSDP's use_orig_params does: 1-D views of shards
            p.data = p.data.flatten()
    assert [[id(p) for p in g["params"]] for g in tiny_mae.param_groups()] == before
    assert len(before[0]) > 20


def test_weight_decay_honours_timm_no_weight_decay():
    """One rule for methods and evaluators: what a timm module lists in no_weight_decay() is not
    decayed, also a matrix and also inside a wrapper (FSDP's names)."""
    from ssl_kit.optim.training import weight_decay_groups

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.rel_pos = torch.nn.Parameter(torch.zeros(3, 4))  # a matrix, listed below

        def no_weight_decay(self):
            return {"rel_pos"}

    model = torch.nn.Sequential(Block(), Block())
    decay, no_decay = weight_decay_groups(model)
    assert {id(p) for p in decay["params"]} == {id(model[0].proj.weight), id(model[1].proj.weight)}
    assert id(model[1].rel_pos) in {id(p) for p in no_decay["params"]}


def test_bf16_on_cpu_unfuses_timm_attention(tiny_mae):
    """Under bf16 on a CPU the flash-attention backward is ~10x its forward: SpeedUp switches timm
    attention to its explicit form there, and leaves fp32 and CUDA runs alone."""
    layers = [m for m in tiny_mae.modules() if hasattr(m, "fused_attn")]
    assert layers and all(m.fused_attn for m in layers)
    SpeedUp().setup(_fake_trainer(precision="32-true"), tiny_mae, "fit")
    assert all(m.fused_attn for m in layers)
    SpeedUp().setup(_fake_trainer(precision="bf16-mixed"), tiny_mae, "fit")
    assert not any(m.fused_attn for m in layers)

"""DINO: loss vs a hand computation, the centre (formula, all-reduced over the global batch),
the EMA teacher, the frozen last layer, the schedules, exact resume, export, configs and a CLI fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from conftest import REPO, assert_ok, run_cli
from ssl_kit.losses.dino import dino_loss, update_center
from ssl_kit.methods.dino import DINO

TINY = dict(model_name="resnet18", img_size=32, local_size=16, local_crops_number=1, out_dim=32, hidden_dim=32,
            bottleneck_dim=16, warmup_epochs=0.0)

#: BN-free (ViT-Tiny, patch 4 at 32 px, LayerNorm; head without BatchNorm) for the DDP comparison:
#: per-process BatchNorm statistics would legitimately differ from one process's.
VIT = dict(TINY, model_name="vit_tiny_patch16_224",
           encoder_kwargs=dict(img_size=32, patch_size=4, dynamic_img_size=True, depth=2))


# --- loss and centre ------------------------------------------------------------------------------
def test_loss_hand_computed_value():
    # K = 2, one image. Teacher (global) views t0, t1; student views s0, s1 (global), s2 (local).
    # Pairs (a, b), a != b: (0, 1), (0, 2), (1, 0), (1, 2).
    c, tau_s, tau_t = [0.5, -0.5], 0.5, 0.25
    t = [[1.0, 0.0], [0.0, 2.0]]
    s = [[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]

    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    p_t = [softmax([(x - ck) / tau_t for x, ck in zip(row, c)]) for row in t]
    log_p_s = [[math.log(p) for p in softmax([x / tau_s for x in row])] for row in s]
    pairs = [(a, b) for a in range(2) for b in range(3) if a != b]
    expected = sum(-sum(q * lp for q, lp in zip(p_t[a], log_p_s[b])) for a, b in pairs) / len(pairs)

    loss = dino_loss([torch.tensor([r]) for r in s], [torch.tensor([r]) for r in t], torch.tensor([c]), tau_s, tau_t)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # By hand: P_t(0) = softmax(2, 2) = (1/2, 1/2); P_t(1) = softmax(-2, 10) ~ (0, 1);
    # log P_s(0) = (-log(1 + e^2), -log(1 + e^-2)), log P_s(1) = (-log(1 + e^-4), -log(1 + e^4)),
    # log P_s(2) = (-log 2, -log 2). H(0,1) = (log(1 + e^-4) + log(1 + e^4)) / 2, H(0,2) = H(1,2) = log 2,
    # H(1,0) ~ log(1 + e^-2): mean 0.8828.
    by_hand = ((math.log1p(math.exp(-4)) + math.log1p(math.exp(4))) / 2 + 2 * math.log(2)
               + math.log1p(math.exp(-2))) / 4
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)


def test_loss_gradient_reaches_the_student_only():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(3, 5, generator=g, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(3, 5, generator=g, requires_grad=True) for _ in range(2)]
    dino_loss(student, teacher, torch.zeros(1, 5)).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad.abs().sum() > 0 for s in student)


def test_center_update_formula():
    center = torch.tensor([[1.0, -2.0, 0.0]])
    teacher = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])]
    batch_mean = torch.tensor([[2.0, 2.0, 2.0]])  # over both views and both images
    update_center(center, teacher, momentum=0.9)
    assert torch.allclose(center, 0.9 * torch.tensor([[1.0, -2.0, 0.0]]) + 0.1 * batch_mean)


def test_forward_updates_the_center_after_the_loss():
    torch.manual_seed(0)
    model = DINO(**VIT)  # no BatchNorm: one view at a time gives what the batched forward gives
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    with torch.no_grad():
        teacher = [model.teacher(v) for v in views[:2]]
        expected_loss = dino_loss([model.head(model.student(v)) for v in views], teacher, torch.zeros(1, 32),
                                  0.1, model.teacher_temp())
    loss = model(views)
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)  # scored against the old centre (0)
    assert torch.allclose(model.center, 0.1 * torch.cat(teacher).mean(0, keepdim=True), atol=1e-6)


# --- DDP: the centre is the global batch's ---------------------------------------------------------------
def _ddp_views(n=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g),
            torch.randn(n, 3, 16, 16, generator=g)]


def _two_steps(model, views):
    """Loss and student gradients of two forward passes (the second scored against the first's centre)."""
    out = []
    for _ in range(2):
        model.zero_grad()
        loss = model(views)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.student.parameters() if p.grad is not None],
                    model.center.clone()))
    return out


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DINO(**VIT)
    results = _two_steps(model, [v.chunk(world)[rank] for v in _ddp_views()])
    for loss, grads, _ in results:  # what DDP does to losses (logged mean) and gradients
        for t in (loss, *grads):
            dist.all_reduce(t)
            t /= world
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    torch.manual_seed(0)
    reference = _two_steps(DINO(**VIT), _ddp_views())
    assert min(max(g.abs().max().item() for g in grads) for _, grads, _ in reference) > 1e-3  # >> the tolerance
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        for (loss, grads, center), (ref_loss, ref_grads, ref_center) in zip(torch.load(tmp_path / f"rank{rank}.pt"),
                                                                            reference):
            assert torch.allclose(center, ref_center, rtol=1e-5, atol=1e-7)  # the global batch's centre
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
            worst = max(((g - r).abs() - 1e-4 * r.abs()).max().item() for g, r in zip(grads, ref_grads))
            assert len(grads) == len(ref_grads) and worst <= 1e-6, worst


# --- teacher, frozen last layer, schedules --------------------------------------------------------------
class Record(pl.Callback):
    """Copies of the student, the teacher and the last layer after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        copy = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
        self.steps.append(dict(epoch=trainer.current_epoch, student=copy(module.student), head=copy(module.head),
                               teacher=copy(module.teacher.module), momentum=module.teacher.momentum.item(),
                               teacher_temp=module.teacher_temp(),
                               wd=[g["weight_decay"] for g in trainer.optimizers[0].param_groups]))


def _fit(model, epochs=2, steps_per_epoch=2, batch_size=4, callbacks=()):
    from ssl_kit.data import SSLDataModule

    dm = SSLDataModule(dataset="synthetic", batch_size=batch_size, num_workers=0, val_fraction=0.0,
                       synthetic_size=batch_size * steps_per_epoch, image_size=40)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, dm)
    return trainer


def test_teacher_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    model = DINO(**TINY, base_momentum=0.9, freeze_last_layer=0)
    before = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    record = Record()
    trainer = _fit(model, epochs=1, steps_per_epoch=1, callbacks=[record])
    assert not any(p.requires_grad or p.grad is not None for p in model.teacher.parameters())
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in model.teacher.parameters()}
    m = record.steps[0]["momentum"]
    assert m == pytest.approx(1.0)  # cosine 0.9 -> 1 reached at step 1 of 1: the teacher did not move
    model.teacher.momentum.fill_(0)
    assert all(torch.equal(p, before[k]) for k, p in model.teacher.module.named_parameters())
    # One EMA step by hand: t <- m t + (1 - m) s with the schedule's momentum at step 1 of 4.
    online = torch.nn.Sequential(model.student, model.head)
    t0 = {k: v.clone() for k, v in model.teacher.module.named_parameters()}
    m = model.teacher.update(online, step=1, total_steps=4)
    assert m == pytest.approx(0.9 + 0.1 * (1 - math.cos(math.pi / 4)) / 2)
    for (k, t), s in zip(model.teacher.module.named_parameters(), online.parameters()):
        assert torch.allclose(t, m * t0[k] + (1 - m) * s, atol=1e-6), k


def test_teacher_moves_toward_the_student_during_fit():
    torch.manual_seed(0)
    model = DINO(**TINY, base_momentum=0.5, final_momentum=0.5, freeze_last_layer=0)
    t0 = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    record = Record()
    _fit(model, epochs=1, steps_per_epoch=1, callbacks=[record])
    step = record.steps[0]
    student = {**{f"0.{k}": v for k, v in step["student"].items()}, **{f"1.{k}": v for k, v in step["head"].items()}}
    for k, _ in model.teacher.module.named_parameters():
        assert torch.allclose(step["teacher"][k], 0.5 * t0[k] + 0.5 * student[k], atol=1e-6), k


def test_last_layer_frozen_in_the_first_epoch_then_trains():
    torch.manual_seed(0)
    model = DINO(**TINY, freeze_last_layer=1)
    w0 = model.head.last_layer.weight.detach().clone()
    mlp0 = model.head.mlp[0].weight.detach().clone()
    record = Record()
    _fit(model, epochs=2, steps_per_epoch=2, callbacks=[record])
    epoch0 = [s for s in record.steps if s["epoch"] == 0]
    assert len(epoch0) == 2 and all(torch.equal(s["head"]["last_layer.weight"], w0) for s in epoch0)
    assert not torch.equal(epoch0[0]["head"]["mlp.0.weight"], mlp0)  # the rest of the head trains
    assert not torch.equal(record.steps[-1]["head"]["last_layer.weight"], w0)  # epoch 2: it trains too


def test_weight_decay_and_teacher_temp_schedules():
    torch.manual_seed(0)
    model = DINO(**TINY, weight_decay_end=0.4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                 warmup_teacher_temp_epochs=3)
    record = Record()
    _fit(model, epochs=2, steps_per_epoch=2, callbacks=[record])
    # Cosine 0.04 -> 0.4 over 4 steps, applied at the start of each step; the no-decay group stays 0.
    expected = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    assert [s["wd"][0] for s in record.steps] == pytest.approx(expected)
    assert all(s["wd"][1] == 0.0 for s in record.steps)
    assert [s["teacher_temp"] for s in record.steps] == pytest.approx([0.04, 0.04, 0.055, 0.055])  # per epoch


@pytest.mark.parametrize("epochs, expected", [(3, [0.04, 0.055, 0.07, 0.07]), (1, [0.04, 0.07]), (0, [0.07])])
def test_teacher_temp_warmup(epochs, expected, monkeypatch):
    """The reference's linspace(warmup_teacher_temp, teacher_temp, epochs)[epoch], then teacher_temp."""
    model = DINO(**TINY, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=epochs)
    temps = []
    for epoch in range(len(expected)):
        monkeypatch.setattr(DINO, "current_epoch", property(lambda self, e=epoch: e))
        temps.append(model.teacher_temp())
    assert temps == pytest.approx(expected)


def test_per_parameter_gradient_clipping(monkeypatch):
    """Each parameter's gradient norm is clipped to clip_grad separately (the reference's rule), not the total norm."""
    torch.manual_seed(0)
    model = DINO(**TINY, clip_grad=0.5, freeze_last_layer=0)
    monkeypatch.setattr(DINO, "current_epoch", property(lambda self: 5))  # no trainer: past the frozen epochs
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)  # norm sqrt(numel) >= 1
    small = torch.full_like(model.student.conv1.weight, 1e-4)  # norm 0.13: below the threshold, untouched
    model.student.conv1.weight.grad = small.clone()
    model.on_before_optimizer_step(None)
    assert torch.equal(model.student.conv1.weight.grad, small)
    norms = [p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None and n != "student.conv1.weight"]
    assert norms and all(n == pytest.approx(0.5, rel=2e-3) for n in norms)  # fp32 norms of 2M ones


# --- views and routing --------------------------------------------------------------------------------
def test_views_and_local_crops_never_reach_the_teacher():
    torch.manual_seed(0)
    model = DINO(**TINY)
    views = model.train_transform()(Image.new("RGB", (48, 40), (90, 120, 200)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    assert [tuple(v.shape[1:]) for v in model.example_batch(2)[0]] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]
    seen = {"teacher": [], "student": []}
    model.teacher.register_forward_pre_hook(lambda m, a: seen["teacher"].append(tuple(a[0].shape)))
    model.student.register_forward_pre_hook(lambda m, a: seen["student"].append(tuple(a[0].shape)))
    model([torch.stack([v] * 3) for v in views])
    assert seen["teacher"] == [(6, 3, 32, 32)]  # both global crops, concatenated; never a local one
    assert seen["student"] == [(6, 3, 32, 32), (3, 3, 16, 16)]


def test_head_last_layer_has_unit_norm_prototypes():
    from ssl_kit.heads.dino import DINOHead

    head = DINOHead(8, out_dim=5, hidden_dim=6, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the stored direction's scale does not matter
    x = torch.randn(3, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    w = head.last_layer.weight / head.last_layer.weight.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), z @ w.T, atol=1e-6)
    assert head(x).abs().max() <= 1.0 + 1e-6  # cosines of unit vectors


@pytest.mark.parametrize("bad, match", [
    (dict(local_crops_number=-1), "local_crops_number=-1"),
    (dict(local_size=48), "local_size=48 is larger"),
    (dict(teacher_temp=0.0), "teacher_temp=0.0"),
    (dict(center_momentum=1.0), "center_momentum=1.0"),
    (dict(model_name="vit_tiny_patch16_224", encoder_kwargs=dict(img_size=32, patch_size=4, depth=1)),
     "dynamic_img_size"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        DINO(**{**TINY, **bad})


# --- export -------------------------------------------------------------------------------
# Exact resume (weights, teacher, centre, optimizer with the weight-decay schedule, loop state,
# across the last layer's release) is tests/test_resume.py's, through the "dino" entry of the zoo.


def test_export_and_load_encoder_give_the_teacher_features(tmp_path):
    """The exported encoder is the teacher backbone (the paper evaluates the teacher), and
    ssl_kit.load_encoder rebuilds it with identical features."""
    import ssl_kit
    from ssl_kit.export import export

    torch.manual_seed(0)
    model = DINO(**VIT, base_momentum=0.5, final_momentum=0.5)
    trainer = _fit(model, epochs=1, steps_per_epoch=1)
    trainer.save_checkpoint(tmp_path / "dino.ckpt")
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        teacher, student = model.teacher.module[0](x), model.student(x)
        assert not torch.allclose(teacher, student, atol=1e-4)  # so the checks below tell them apart
        assert torch.equal(model.extract_features(x), teacher)
        for source in (tmp_path / "dino.ckpt", export(str(tmp_path / "dino.ckpt"), str(tmp_path / "enc.safetensors"))):
            assert torch.equal(ssl_kit.load_encoder(str(source))(x), teacher), source


# --- configs and CLI ------------------------------------------------------------------------------------
def test_paper_recipe():
    """DINO (Caron et al. 2021), ViT-S/16: 2 x 224 + 10 x 96 crops, K = 65536, head 2048 -> 256,
    tau_s 0.1, tau_t 0.04 -> 0.07 over 30 epochs, centre 0.9, teacher 0.996 -> 1, AdamW lr
    5e-4 x batch / 256 at batch 1024, 10 warm-up epochs, wd 0.04 -> 0.4, clip 3.0, last layer frozen 1 epoch."""
    from test_configs import global_batch, optimizer, resolved

    cfg = resolved("configs/dino.yaml")
    m = cfg.model.init_args
    assert cfg.model.class_path == "ssl_kit.methods.DINO"
    assert (m.model_name, m.img_size, m.local_size, m.local_crops_number) == ("vit_small_patch16_224", 224, 96, 10)
    assert m.encoder_kwargs["dynamic_img_size"] is True
    assert tuple(m.global_crops_scale) == (0.4, 1.0) and tuple(m.local_crops_scale) == (0.05, 0.4)
    assert (m.out_dim, m.hidden_dim, m.bottleneck_dim, m.head_batch_norm) == (65536, 2048, 256, False)
    assert (m.student_temp, m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.1, 0.04, 0.07, 30)
    assert (m.center_momentum, m.base_momentum, m.final_momentum) == (0.9, 0.996, 1.0)
    assert (m.weight_decay_end, m.clip_grad, m.freeze_last_layer) == (0.4, 3.0, 1)
    name, kwargs = optimizer(cfg)
    assert name == "torch.optim.AdamW" and (kwargs["lr"], kwargs["weight_decay"]) == (5e-4, 0.04)
    assert m.lr_scaling is True and global_batch(cfg) == 1024 and m.warmup_epochs == 10


@pytest.mark.slow
def test_cli_fit_two_steps(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(REPO / "configs/demo/dino.yaml"), "--data.dataset", "synthetic",
                   "--data.synthetic_size", "40", "--data.batch_size", "16", "--data.num_workers", "0",
                   "--trainer.max_epochs", "1", "--checkpoint.every_n_epochs", "1",
                   "--trainer.default_root_dir", str(run_dir), "--model.init_args.hidden_dim", "64")
    assert_ok(proc)
    ckpt = torch.load(sorted(run_dir.glob("*.ckpt"))[-1], map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["ssl_kit"]["method"] == "DINO"
    assert ckpt["state_dict"]["center"].abs().sum() > 0  # the centre is saved
    assert "pretrained" in (run_dir / "eval.json").read_text()

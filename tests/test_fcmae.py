import json

import pytest
import timm
import torch

from ssl_kit.backbones.convnextv2_sparse import (
    FastGlobalResponseNorm, create_convnextv2, forward_dense_masked, forward_sparse, grn_norm,
)
from ssl_kit.losses import masked_mse, pixel_targets
from ssl_kit.masking.hierarchical import kept_indices, random_grid_mask, upsample_mask
from ssl_kit.methods import FCMAE

from conftest import REPO, assert_ok, run_cli

#: convnextv2_atto at 64 px: a 2x2 grid of 32x32 patches; decoder narrowed for speed.
TINY_FCMAE = dict(model_name="convnextv2_atto", img_size=64, decoder_embed_dim=64, warmup_epochs=0.0)


def randomise_grn(model: torch.nn.Module, seed: int = 0) -> None:
    """GRN's gamma/beta start at zero (GRN = identity); give them values so GRN is exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".grn." in name:
            p.data = 0.5 * torch.randn(p.shape, generator=g)


@pytest.fixture(scope="module")
def atto():
    torch.manual_seed(0)
    model = create_convnextv2("convnextv2_atto").double()
    randomise_grn(model)
    return model


def pixel_mask_of(mask: torch.Tensor, patch: int = 32) -> torch.Tensor:
    return upsample_mask(mask, patch).unsqueeze(1)  # (B, 1, H, W)


def test_mask_upsampling_and_kept_indices():
    mask = random_grid_mask((3, 4), 0.6, 5)
    assert mask.shape == (5, 3, 4) and torch.all(mask.sum((1, 2)) == 12 - int(12 * 0.4))
    up = upsample_mask(mask, 8)  # stride-4 map of a stride-32 mask
    assert up.shape == (5, 24, 32) and torch.equal(up[:, ::8, ::8], mask)
    ids = kept_indices(up)
    assert ids.shape == (5, int(12 * 0.4) * 64)
    assert torch.all(up.flatten(1).gather(1, ids) == 0) and torch.all(ids.diff(dim=1) > 0)
    with pytest.raises(ValueError, match="same number of cells"):
        kept_indices(torch.tensor([[[0.0, 1.0]], [[0.0, 0.0]]]))


@pytest.mark.parametrize("conv_mlp, size, grid", [(True, (64, 96), (2, 3)), (False, (64, 64), (2, 2))])
def test_sparse_equals_dense_masked_outputs_and_gradients(conv_mlp, size, grid):
    """The sparse forward equals the dense-masked definition, values and gradients (fp64), for
    timm's 1x1-conv MLP layout (atto ... nano) and its Linear layout (tiny ... huge), with random
    GRN and stochastic depth. A shallow atto keeps it fast; every layer kind is still there."""
    torch.manual_seed(0)
    model = create_convnextv2("convnextv2_atto", depths=(1, 1, 2, 1), conv_mlp=conv_mlp, drop_path_rate=0.3)
    model = model.double().train()
    randomise_grn(model)
    imgs = torch.randn(3, 3, *size, dtype=torch.double)
    mask = random_grid_mask(grid, 0.5, 3).double()
    weight = torch.randn(3, model.num_features, *grid, dtype=torch.double)  # an arbitrary loss
    results = []
    for forward in (forward_sparse, forward_dense_masked):
        model.zero_grad()
        x = imgs.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same stochastic-depth draws in both
        out = forward(model, x, mask)
        (out * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), x.grad, grads))
    (out_s, gx_s, g_s), (out_d, gx_d, g_d) = results
    assert torch.allclose(out_s, out_d, atol=1e-10)
    assert torch.all(out_s * mask.unsqueeze(1) == 0) and out_s.abs().sum() > 0
    assert torch.allclose(gx_s, gx_d, atol=1e-10)
    assert g_s.keys() == g_d.keys() and len(g_s) > 50
    for n in g_s:
        assert torch.allclose(g_s[n], g_d[n], atol=1e-10), n


def test_sparse_fp32_tolerance(atto):
    model = create_convnextv2("convnextv2_atto").eval()
    model.load_state_dict({k: v.float() for k, v in atto.state_dict().items()})
    imgs, mask = torch.randn(2, 3, 64, 64), random_grid_mask((2, 2), 0.5, 2)
    with torch.no_grad():
        assert torch.allclose(forward_sparse(model, imgs, mask), forward_dense_masked(model, imgs, mask), atol=1e-4)


def test_mask_ratio_zero_equals_timm_forward_features(atto):
    imgs = torch.randn(2, 3, 64, 96, dtype=torch.double)
    with torch.no_grad():
        ours = forward_sparse(atto.eval(), imgs, torch.zeros(2, 2, 3, dtype=torch.double))
        assert torch.allclose(ours, atto.forward_features(imgs), atol=1e-10)


def test_fast_grn_equals_timm_outputs_gradients_and_state_dict():
    """create_convnextv2 swaps timm's GRN for FastGlobalResponseNorm: same keys, outputs, gradients."""
    ours = create_convnextv2("convnextv2_atto").double()
    theirs = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).double()
    assert any(isinstance(m, FastGlobalResponseNorm) for m in ours.modules())
    assert not any(isinstance(m, FastGlobalResponseNorm) for m in theirs.modules())
    theirs.load_state_dict(ours.state_dict())  # strict: identical keys and shapes
    for m in ours.modules():  # non-zero GRN parameters, so the norm reaches the output
        if isinstance(m, FastGlobalResponseNorm):
            torch.nn.init.normal_(m.weight, std=0.5), torch.nn.init.normal_(m.bias, std=0.5)
    theirs.load_state_dict(ours.state_dict())
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.double)
    out_ours, out_theirs = ours(imgs), theirs(imgs)
    assert torch.allclose(out_ours, out_theirs, atol=1e-10)
    out_ours.square().sum().backward(), out_theirs.square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-7, atol=1e-10), name


def test_evaluation_jobs_and_teachers_run_convnextv2_with_the_fast_grn(tmp_path):
    """load_encoder returns timm's model as it is; the linear probe / fine-tune jobs and the EVA
    teacher, which encode with it, switch its GRN (a dense ConvNeXt V2 file as the source)."""
    from safetensors.torch import save_file

    from ssl_kit.backbones.teacher import TeacherConfig, encoder_tower
    from ssl_kit.checkpoints import load_encoder
    from ssl_kit.evaluators import LinearProbe

    path = tmp_path / "atto.safetensors"
    save_file(timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).state_dict(), str(path),
              metadata={"timm_model": "convnextv2_atto", "timm_kwargs": "{}"})
    fast = lambda model: any(isinstance(m, FastGlobalResponseNorm) for m in model.modules())  # noqa: E731
    assert not fast(load_encoder(str(path)))
    assert fast(LinearProbe(str(path), img_size=64).encoder)
    assert fast(encoder_tower(TeacherConfig("encoder", checkpoint=str(path))))


def test_grn_norm_of_zeros_has_zero_gradient_like_torch_norm():
    x = torch.zeros(2, 3, 3, 4, requires_grad=True)
    grn_norm(x, (1, 2)).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    y = torch.randn(2, 5, 3)
    assert torch.allclose(grn_norm(y, 1), y.norm(p=2, dim=1, keepdim=True), rtol=1e-6)


def test_removed_pixels_reach_no_visible_output(atto):
    """Gradient of every output w.r.t. removed pixels is exactly zero, and tampering with them
    changes nothing; the visible pixels do matter."""
    mask = random_grid_mask((2, 2), 0.5, 2).double()
    pix = pixel_mask_of(mask)
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.double, requires_grad=True)
    out = forward_sparse(atto.eval(), imgs, mask)
    out.pow(2).sum().backward()
    assert torch.all(imgs.grad * pix == 0) and torch.all((imgs.grad * (1 - pix)).abs().sum((1, 2, 3)) > 0)
    with torch.no_grad():
        tampered = forward_sparse(atto, imgs + 100 * torch.randn_like(imgs) * pix, mask)
    assert torch.equal(out.detach(), tampered)


def test_loss_terms_change_only_through_removed_targets():
    torch.manual_seed(0)
    fcmae = FCMAE(**TINY_FCMAE).eval()
    randomise_grn(fcmae)
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_grid_mask((2, 2), 0.5, 2)
    tampered = imgs + 5 * torch.randn_like(imgs) * pixel_mask_of(mask)
    with torch.no_grad():
        (loss_a, pred_a, m), (loss_b, pred_b, _) = fcmae(imgs, mask=mask), fcmae(tampered, mask=mask)
    assert torch.equal(pred_a, pred_b)  # predictions never see removed pixels
    per_patch = [(p - pixel_targets(x, 32, True)).pow(2).mean(-1) for p, x in ((pred_a, imgs), (pred_b, tampered))]
    assert torch.equal(per_patch[0][m == 0], per_patch[1][m == 0])
    assert not torch.allclose(per_patch[0][m == 1], per_patch[1][m == 1])
    assert loss_a == pytest.approx(masked_mse(pred_a, pixel_targets(imgs, 32, True), m).item())
    assert loss_a != loss_b  # only through the removed patches' targets


def test_forward_reconstruct_and_features_shapes():
    torch.manual_seed(0)
    fcmae = FCMAE(**TINY_FCMAE)
    loss, pred, mask = fcmae(torch.randn(3, 3, 64, 64))
    assert pred.shape == (3, 4, 32 * 32 * 3) and mask.shape == (3, 4) and torch.all(mask.sum(1) == 4 - int(4 * 0.4))
    recon, mask = fcmae.reconstruct(torch.randn(2, 3, 64, 64))
    assert recon.shape == (2, 3, 64, 64) and fcmae.patch_size == 32
    assert fcmae.extract_features(torch.randn(2, 3, 64, 64)).shape == (2, 320)
    assert not any(p.requires_grad for p in fcmae.encoder.head.parameters())


def test_learns_a_fixed_batch():
    torch.manual_seed(0)
    fcmae = FCMAE(**TINY_FCMAE)
    imgs = torch.randn(4, 3, 64, 64)
    opt = torch.optim.AdamW([p for p in fcmae.parameters() if p.requires_grad], lr=2e-3)
    mask = random_grid_mask((2, 2), 0.6, 4)
    losses = []
    for _ in range(40):
        loss, _, _ = fcmae(imgs, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < 0.5 * losses[0]:
            break
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(img_size=48), "img_size=48 is not divisible by the network's total stride 32"),
        (dict(mask_ratio=1.0), "mask_ratio=1.0"),
        (dict(mask_ratio=0.0), "mask_ratio=0.0"),
        (dict(img_size=32), "would keep none"),
        (dict(model_name="convnextv2_attoo"), "Unknown timm model name 'convnextv2_attoo'"),
        (dict(model_name="convnext_atto"), "'convnext_atto' is not a ConvNeXt V2; .*convnextv2_base"),
        (dict(model_name="resnet18"), "'resnet18' is not a ConvNeXt V2"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FCMAE(**{**TINY_FCMAE, **kwargs})


def test_bad_image_size_at_forward():
    fcmae = FCMAE(**TINY_FCMAE)
    with pytest.raises(ValueError, match="image size 64x80 is not divisible by the network's total stride 32"):
        fcmae(torch.randn(1, 3, 64, 80))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/fcmae.yaml", "configs/demo/fcmae.yaml"])
def test_configs_resolve(config):
    proc = run_cli("fit", "--config", config, "--data.root", "/data/imagenet", "--print_config")
    assert_ok(proc)
    assert "class_path: ssl_kit.methods.FCMAE" in proc.stdout


@pytest.mark.slow
def test_cli_fit_two_steps_then_export_loads_in_timm(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "fit", "--config", str(REPO / "configs/demo/fcmae.yaml"), "--data.dataset", "synthetic",
        "--data.synthetic_size", "8", "--data.batch_size", "4", "--data.num_workers", "0",
        "--data.image_size", "64", "--model.init_args.img_size", "64", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.callbacks", "[]",
        "--checkpoint.save_last", "true", "--trainer.default_root_dir", str(run_dir), cwd=tmp_path,
    )
    assert_ok(proc)
    assert (run_dir / "last.ckpt").is_file()
    out = tmp_path / "encoder.safetensors"
    assert_ok(run_cli("export", str(run_dir / "last.ckpt"), "--output", str(out), cwd=tmp_path))

    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = safe_open(str(out), "pt").metadata()
    model = timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out)), **json.loads(meta["timm_kwargs"]))
    state = load_file(str(out))
    assert meta["timm_model"] == "convnextv2_atto"
    # The demo's encoder_kwargs (Atto's widths, 2 blocks per stage) travel with the weights.
    assert json.loads(meta["timm_kwargs"])["depths"] == [2, 2, 2, 2]
    assert [len(stage.blocks) for stage in model.stages] == [2, 2, 2, 2]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert state.keys() == model.state_dict().keys()

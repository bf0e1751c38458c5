"""EVA: block masks, the negative-cosine loss, the frozen teacher (open_clip and ssl_kit encoders),
checkpoints without the teacher, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy import ndimage

from conftest import assert_ok, run_cli
from ssl_kit.backbones.teacher import FrozenTeacher, TeacherConfig
from ssl_kit.backbones.vit import forward_mask_token
from ssl_kit.losses import masked_negative_cosine
from ssl_kit.masking import block_masking
from ssl_kit.views import IMAGENET_MEAN, IMAGENET_STD

#: A tiny open_clip CLIP (vision: 32 px, patch 4 -> 8x8 tokens, width 64, 2 layers).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1},
}
TINY_STUDENT = dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, min_num_patches=8, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """(model-config JSON, full-CLIP state dict file, the open_clip model) of a random tiny CLIP."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "ssl-kit-test-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("ssl-kit-test-clip", pretrained=None).eval()
    weights = root / "clip.bin"
    torch.save(model.state_dict(), weights)
    return config, weights, model


def clip_teacher(clip_files, **kwargs) -> TeacherConfig:
    config, weights, _ = clip_files
    return TeacherConfig("open_clip", str(config), checkpoint=str(weights), **kwargs)


def to_clip_input(imgs: torch.Tensor) -> torch.Tensor:
    """Reference re-normalisation: ImageNet-normalised -> pixels -> OpenAI-CLIP-normalised."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    clip_mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    clip_std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (imgs * std + mean - clip_mean) / clip_std


# --- block masking --------------------------------------------------------------------------
def test_block_masks_reach_ratio_in_contiguous_blocks_different_per_sample():
    grid, ratio, min_patches = (14, 14), 0.4, 16
    mask = block_masking(grid, ratio, 64, min_patches, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 196) and set(mask.unique().tolist()) <= {0.0, 1.0}
    achieved = mask.mean(dim=1)
    assert abs(achieved.mean().item() - ratio) < 0.03
    assert achieved.max().item() <= round(ratio * 196) / 196 and achieved.min().item() > 0.3
    for sample in mask.view(64, *grid).numpy():
        labels, n = ndimage.label(sample)  # 4-connected regions of masked patches
        sizes = ndimage.sum(sample, labels, range(1, n + 1))
        assert sizes.max() >= min_patches, "the first block holds at least min_num_patches"
        # As in BEiT, blocks below min_num_patches are drawn only to top up the last few patches.
        assert sizes[sizes < min_patches].sum() < min_patches
    assert len({tuple(m.tolist()) for m in mask}) == 64


def test_block_masking_refuses_a_target_below_one_block():
    with pytest.raises(ValueError, match="min_num_patches=16"):
        block_masking((8, 8), 0.2, 2, min_num_patches=16)


# --- loss ------------------------------------------------------------------------------------
def test_loss_is_minus_one_at_a_perfect_match_and_ignores_kept_positions():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.float)
    pred = torch.where(mask.bool().unsqueeze(-1), 3.0 * target, torch.randn(2, 6, 8))
    assert torch.allclose(masked_negative_cosine(pred, target, mask), torch.tensor(-1.0))
    kept_changed = pred + (1 - mask).unsqueeze(-1) * torch.randn(2, 6, 8)
    assert torch.allclose(masked_negative_cosine(kept_changed, target, mask), torch.tensor(-1.0))
    # Hand-computed: of 4 masked positions, one is flipped (cos -1) and one orthogonal (cos 0).
    pred[0, 0] = -target[0, 0]
    pred[1, 3] = torch.zeros(8).index_fill_(0, torch.tensor([0]), 1.0)
    target[1, 3] = torch.zeros(8).index_fill_(0, torch.tensor([1]), 1.0)
    loss = masked_negative_cosine(pred.bfloat16(), target, mask)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, torch.tensor(-(1 - 1 + 0 + 1) / 4), atol=1e-2)


# --- teacher ---------------------------------------------------------------------------------
def test_open_clip_teacher_loads_by_path_and_matches_open_clip_tokens(clip_files):
    _, _, model = clip_files
    teacher = FrozenTeacher(clip_teacher(clip_files))
    for name, value in model.visual.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[name], value), name
    imgs = torch.randn(2, 3, 32, 32)
    model.visual.output_tokens = True
    with torch.no_grad():
        _, ref = model.visual(to_clip_input(imgs))  # (B, 64, 64): open_clip's own token output
    model.visual.output_tokens = False
    assert torch.allclose(teacher(imgs, (8, 8)), ref, atol=1e-5)
    # Coarser student grid: targets are 2x2 means of the teacher tokens over the same region.
    pooled = ref.view(2, 4, 2, 4, 2, 64).mean(dim=(2, 4)).reshape(2, 16, 64)
    assert torch.allclose(teacher(imgs, (4, 4)), pooled, atol=1e-5)
    projected = FrozenTeacher(clip_teacher(clip_files, project=True))(imgs, (8, 8))
    assert torch.allclose(projected, ref @ model.visual.proj, atol=1e-5)


def test_teacher_refuses_bad_input(clip_files, tmp_path):
    config, weights, model = clip_files
    missing = tmp_path / "nowhere" / "clip.bin"
    with pytest.raises(FileNotFoundError, match="nowhere/clip.bin"):
        FrozenTeacher(TeacherConfig("open_clip", str(config), checkpoint=str(missing)))
    demo_teacher = tmp_path / "runs" / "demo" / "mae" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=r"run `python -m ssl_kit fit --config configs/demo/mae.yaml` first"):
        FrozenTeacher(TeacherConfig("encoder", checkpoint=str(demo_teacher)))
    with pytest.raises(ValueError, match="random_init"):
        FrozenTeacher(TeacherConfig("open_clip", str(config)))
    with pytest.raises(ValueError, match="ViT-L-41.*ViT-L-14"):
        FrozenTeacher(TeacherConfig("open_clip", "ViT-L-41", random_init=True))
    state = {k: v for k, v in model.state_dict().items() if k != "visual.ln_post.weight"}
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.bin")
    with pytest.raises(ValueError, match=r"missing keys: ln_post\.weight.*shape mismatches: proj"):
        FrozenTeacher(TeacherConfig("open_clip", str(config), checkpoint=str(tmp_path / "bad.bin")))
    teacher = FrozenTeacher(TeacherConfig("open_clip", str(config), random_init=True))
    with pytest.raises(ValueError, match="teacher grid 8x8 .* coarser than the student's 16x16"):
        teacher.check_grid((16, 16))


def test_encoder_teacher_from_an_exported_ssl_kit_file(tmp_path):
    from safetensors.torch import save_file

    from ssl_kit.backbones.vit import create_vit

    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=4).eval()
    path = tmp_path / "encoder.safetensors"  # the layout `python -m ssl_kit export` writes
    kwargs = json.dumps({"img_size": 32, "patch_size": 4})
    meta = {"timm_model": "vit_tiny_patch16_224", "timm_kwargs": kwargs, "format": "pt"}
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path), metadata=meta)
    teacher = FrozenTeacher(TeacherConfig("encoder", checkpoint=str(path)))
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit.forward_features(imgs)[:, vit.num_prefix_tokens:]  # (B, 64, 192)
    assert torch.allclose(teacher(imgs, (8, 8)), ref, atol=1e-5)


# --- the method ------------------------------------------------------------------------------
def test_teacher_is_frozen_and_out_of_checkpoints(clip_files, tmp_path):
    import pytorch_lightning as pl

    from ssl_kit.data import SSLDataModule
    from ssl_kit.checkpoints import load_checkpoint
    from ssl_kit.methods import EVA

    torch.manual_seed(0)
    model = EVA(teacher=clip_teacher(clip_files), **TINY_STUDENT)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = model.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    data = SSLDataModule("synthetic", batch_size=4, num_workers=0, synthetic_size=16)
    trainer = pl.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(model, data)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) not in optimized and p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert id(model.mask_token) in optimized and id(model.head.weight) in optimized
    model.train()  # what Lightning does at every epoch start
    assert not model.teacher.training and not model.teacher.model.training and model.encoder.training
    for name, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not torch.equal(model.encoder.blocks[0].mlp.fc1.weight, student_before)

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = load_checkpoint(tmp_path / "last.ckpt")  # weights_only=True must succeed
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert ckpt["ssl_kit"]["teacher"]["checkpoint"] == str(clip_files[1])
    # export writes the student encoder only: its keys and values, its architecture, no teacher.
    from safetensors import safe_open

    from ssl_kit.export import export

    out = export(str(tmp_path / "last.ckpt"), str(tmp_path / "student.safetensors"))
    with safe_open(str(out), "pt") as f:
        exported, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    student = model.encoder.state_dict()
    assert set(exported) == set(student) and all(torch.equal(exported[k], v) for k, v in student.items())
    assert (meta["timm_model"], json.loads(meta["timm_kwargs"])) == (model.encoder_spec[0], model.encoder_spec[1])
    restored = EVA.load_from_checkpoint(tmp_path / "last.ckpt")  # strict: the teacher comes back from its file
    assert torch.equal(restored.encoder.blocks[0].mlp.fc1.weight, model.encoder.blocks[0].mlp.fc1.weight)
    assert torch.equal(restored.teacher.model.ln_post.weight, teacher_before["model.ln_post.weight"])
    resumed = pl.Trainer(max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    resumed.fit(EVA(teacher=clip_teacher(clip_files), **TINY_STUDENT), data, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 3


def test_student_sees_mask_tokens_at_masked_positions_only(clip_files):
    from ssl_kit.methods import EVA

    torch.manual_seed(0)
    model = EVA(teacher=clip_teacher(clip_files), **TINY_STUDENT).eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = model.draw_mask(2, imgs.device)
    patch = torch.zeros(2, 64, dtype=torch.bool)
    patch[0, mask[0].argmax()] = True  # perturb the pixels of one masked patch of sample 0
    pixel = patch.view(2, 1, 8, 8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    with torch.no_grad():
        out = forward_mask_token(model.encoder, imgs, mask, model.mask_token)
        out_perturbed = forward_mask_token(model.encoder, imgs + 5.0 * pixel, mask, model.mask_token)
    assert torch.allclose(out, out_perturbed, atol=1e-5), "a masked patch's pixels must not reach the student"
    # Evaluators read the mean of the same final-norm patch tokens the loss trains.
    with torch.no_grad():
        unmasked = forward_mask_token(model.encoder, imgs, torch.zeros(2, 64), model.mask_token)
        assert torch.allclose(model.extract_features(imgs), unmasked[:, 1:].mean(1), atol=1e-5)


def test_pooled_target_adds_the_weighted_cosine_of_the_pooled_features():
    """pooled_weight w adds w x (-cos) between the student's pooled feature (its mean final-norm
    patch token, through the pooled head or, with pooled_projection false, as it is) and the
    teacher's pooled feature; a width mismatch without the head is refused at construction."""
    from ssl_kit.errors import UserError
    from ssl_kit.methods import EVA

    teacher = TeacherConfig("encoder", "vit_tiny_patch16_224", random_init=True)  # width 192, as the student
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    for projection in (True, False):
        torch.manual_seed(0)
        model = EVA(teacher=teacher, pooled_weight=0.5, pooled_projection=projection, **TINY_STUDENT).eval()
        assert isinstance(model.pooled_head, torch.nn.Linear if projection else torch.nn.Identity)
        mask = model.draw_mask(2, imgs.device)
        with torch.no_grad():
            loss, _ = model(imgs, mask)
            target, pooled_target = model.teacher.targets(imgs, model.grid)
            tokens = forward_mask_token(model.encoder, imgs, mask, model.mask_token)[:, 1:]  # (B, L, D) patch tokens
            patch_loss = masked_negative_cosine(model.head(tokens), target, mask)
            pooled = model.pooled_head(tokens.mean(1))  # (B, D)
        expected = patch_loss - 0.5 * F.cosine_similarity(pooled, pooled_target, dim=-1).mean()
        assert torch.allclose(loss, expected, atol=1e-5), projection
    with pytest.raises(UserError, match="pooled_projection=false needs the student's width \\(128\\)"):
        EVA(teacher=teacher, pooled_weight=1.0, pooled_projection=False,
            **dict(TINY_STUDENT, encoder_kwargs=dict(embed_dim=128, depth=2, num_heads=2)))


# --- CLI -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_configs_resolve():
    real = run_cli("fit", "--config", "configs/eva.yaml", "--data.root", "/data/imagenet/train",
                   "--model.teacher.checkpoint", "/models/clip-vit-l-14.bin", "--print_config")
    assert_ok(real)
    teacher = yaml.safe_load(real.stdout)["model"]["init_args"]["teacher"]
    assert teacher["model_name"] == "ViT-L-14" and teacher["checkpoint"] == "/models/clip-vit-l-14.bin"
    demo = run_cli("fit", "--config", "configs/demo/eva.yaml", "--print_config")
    assert_ok(demo)
    assert yaml.safe_load(demo.stdout)["model"]["init_args"]["teacher"]["kind"] == "encoder"


@pytest.mark.slow
def test_two_step_fit_through_the_cli(tmp_path):
    config = tmp_path / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    proc = run_cli(
        "fit", "--config", "configs/demo/eva.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.teacher.kind", "open_clip", "--model.teacher.model_name", str(config),
        "--model.teacher.checkpoint", "null", "--model.teacher.random_init", "true",
        "--model.min_num_patches", "8", "--trainer.max_epochs", "1", "--trainer.callbacks", "[]",
        "--model.pooled_projection", "true",  # the tiny CLIP's pooled width (32) is not the student's (128)
        "--data.dataset", "synthetic", "--data.synthetic_size", "8", "--data.val_fraction", "0",
        "--data.batch_size", "4", "--data.num_workers", "0",
        "--checkpoint.save_last", "true",  # the CLI's parser default (null) overrides RunCheckpoint's True
    )
    assert_ok(proc)
    ckpt = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert (tmp_path / "run" / "config.yaml").is_file()

"""load_encoder: every source kind gives the same features as the model it was built from."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from conftest import TINY_MAE
from ssl_kit import load_encoder

VIT_BLOCK_KEYS = [  # one block of the reference MAE repo's ViT (timm's layout at the time)
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]


def official_mae_state(encoder) -> dict:
    """The encoder in the official MAE key layout, written out key by key, plus decoder keys."""
    own = encoder.state_dict()
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    names += [f"blocks.{i}.{k}" for i in range(len(encoder.blocks)) for k in VIT_BLOCK_KEYS]
    state = {name: own[name].clone() for name in names}
    state.update({"mask_token": torch.zeros(1, 1, 64), "decoder_embed.weight": torch.randn(64, 192),
                  "decoder_pos_embed": torch.zeros(1, 65, 64), "decoder_pred.weight": torch.randn(48, 64)})
    return state


@pytest.fixture(scope="module")
def mae_encoder():
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    return MAE(**TINY_MAE).encoder.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def features(model, x):
    with torch.inference_mode():
        return model.eval()(x)


def test_official_mae_checkpoint_gives_identical_features(tmp_path, mae_encoder, images):
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": official_mae_state(mae_encoder)}, path)
    for model_name in (None, "vit_tiny_patch16_224"):  # inferred from the shapes, or named
        loaded = load_encoder(path, model_name=model_name)
        assert not loaded.training
        assert torch.equal(features(loaded, images), features(mae_encoder, images))


def test_position_embedding_is_interpolated_to_the_eval_resolution(tmp_path, mae_encoder):
    path = tmp_path / "mae.pth"
    torch.save({"model": official_mae_state(mae_encoder)}, path)
    loaded = load_encoder(path, img_size=48)  # 8x8 grid -> 12x12
    expected = resample_abs_pos_embed(mae_encoder.pos_embed.detach(), new_size=[12, 12], num_prefix_tokens=1)
    assert loaded.pos_embed.shape == (1, 1 + 144, 192)
    assert torch.allclose(loaded.pos_embed, expected)
    assert loaded.pretrained_cfg["input_size"] == (3, 48, 48)
    assert features(loaded, torch.randn(2, 3, 48, 48)).shape == (2, 192)


def test_missing_encoder_weight_is_named(tmp_path, mae_encoder):
    state = official_mae_state(mae_encoder)
    del state["blocks.5.attn.qkv.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=r"missing.*blocks\.5\.attn\.qkv\.weight"):
        load_encoder(path)


def test_unknown_formats_list_accepted_formats_and_found_keys(tmp_path):
    path = tmp_path / "weird.pth"
    torch.save({"weights": {"layer.w": torch.zeros(2)}, "step": 3}, path)
    with pytest.raises(ValueError, match=r"unknown encoder file format.*Accepted:.*ssl_kit.*MAE.*ConvNeXt V2.*timm.*'?weights"):
        load_encoder(path)
    bare = tmp_path / "bare.safetensors"
    save_file({"layer.w": torch.zeros(2)}, str(bare))
    with pytest.raises(ValueError, match=r"unknown encoder file format.*layer\.w"):
        load_encoder(bare)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_encoder(tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="Unknown timm model name 'vit_tinyy'"):
        load_encoder("vit_tinyy")


def test_timm_name_is_a_random_init_feature_extractor():
    model = load_encoder("resnet18", img_size=32)
    assert not model.training and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert features(model, torch.randn(2, 3, 32, 32)).shape == (2, 512)


# --- ConvNeXt V2: official dense (fine-tuned) and FCMAE (sparse pretraining) layouts ----------
@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=0).eval()
    with torch.no_grad():
        for p in model.parameters():  # GRN and norms start as identities: make every tensor count
            p.add_(0.1 * torch.randn_like(p))
    return model


def official_dense_state(model) -> dict:
    """timm ConvNeXt V2 -> the official repo's dense layout (Linear pwconvs, GRN as (1, 1, 1, C))."""
    out = {}
    for key, v in model.state_dict().items():
        k = key.replace("stem.", "downsample_layers.0.").replace("head.norm.", "norm.")
        if ".downsample." in k:
            stage = k.split(".")[1]
            k = k.replace(f"stages.{stage}.downsample.", f"downsample_layers.{stage}.")
        k = k.replace(".blocks.", ".").replace(".conv_dw.", ".dwconv.").replace(".mlp.fc", ".pwconv")
        if ".mlp.grn." in k:
            k = k.replace(".mlp.grn.weight", ".grn.gamma").replace(".mlp.grn.bias", ".grn.beta")
            v = v.reshape(1, 1, 1, -1)
        if ".pwconv" in k and v.ndim == 4:
            v = v.flatten(1)  # (out, in, 1, 1) -> Linear (out, in)
        out[k] = v.clone()
    out["head.weight"], out["head.bias"] = torch.randn(10, 320), torch.zeros(10)
    return out


def sparse_kernel(weight: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernel of a dense conv weight: offset (h, w) stored at row w * k + h."""
    k = weight.shape[-1]
    rows = [None] * (k * k)
    for h in range(k):
        for w in range(k):
            rows[w * k + h] = weight[:, 0, h, w] if weight.shape[1] == 1 else weight[:, :, h, w].T  # (C,) / (in, out)
    return torch.stack(rows)


def official_fcmae_state(dense: dict) -> dict:
    """Dense official layout -> FCMAE checkpoint: 'encoder.' sparse modules + decoder keys, no final norm."""
    out = {}
    for k, v in dense.items():
        parts = k.split(".")
        if parts[0] in ("norm", "head"):
            continue
        if k.startswith("downsample_layers.0."):  # the stem runs dense in FCMAE
            out["encoder." + k] = v
            continue
        module, param = k.rsplit(".", 1)
        downsample = parts[0] == "downsample_layers"
        if module.endswith(".dwconv") or (downsample and parts[2] == "1"):  # Minkowski convolutions
            k, v = (f"{module}.kernel", sparse_kernel(v)) if param == "weight" else (k, v.reshape(1, -1))
        elif module.endswith(".norm") or (downsample and parts[2] == "0"):  # MinkowskiLayerNorm
            k = f"{module}.ln.{param}"
        elif ".pwconv" in module:  # MinkowskiLinear
            k = f"{module}.linear.{param}"
        elif module.endswith(".grn"):
            v = v.reshape(1, -1)
        out["encoder." + k] = v
    out.update({"mask_token": torch.zeros(1, 512, 1, 1), "proj.weight": torch.randn(512, 320, 1, 1),
                "decoder.0.dwconv.weight": torch.randn(512, 1, 7, 7), "pred.weight": torch.randn(3072, 512, 1, 1)})
    return out


def test_official_convnextv2_dense_checkpoint_gives_identical_features(tmp_path, convnext):
    path = tmp_path / "convnextv2_atto_1k_224_ema.pt"
    torch.save({"model": official_dense_state(convnext)}, path)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(features(load_encoder(path), x), features(convnext, x))


def test_official_fcmae_checkpoint_gives_identical_features(tmp_path, convnext):
    state = official_fcmae_state(official_dense_state(convnext))
    assert state["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
    assert state["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    path = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="convnextv2_atto")}, path)
    reference = timm.create_model("convnextv2_atto", num_classes=0).eval()
    reference.load_state_dict(convnext.state_dict())
    torch.nn.init.ones_(reference.head.norm.weight), torch.nn.init.zeros_(reference.head.norm.bias)  # no final norm
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(features(load_encoder(path), x), features(reference, x))


# --- ssl_kit's own files: a training checkpoint and its export ---------------------------------
def test_ssl_kit_checkpoint_and_export_give_identical_features(tmp_path, images):
    import pytorch_lightning as pl

    from ssl_kit.data import SSLDataModule
    from ssl_kit.export import export
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    mae = MAE(**TINY_MAE)
    dm = SSLDataModule(dataset="synthetic", synthetic_size=10, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(mae, datamodule=dm)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = features(mae.encoder, images)
    assert torch.equal(features(load_encoder(ckpt), images), expected)
    exported = export(str(ckpt), str(tmp_path / "vit_tiny_mae.safetensors"))
    assert torch.equal(features(load_encoder(exported), images), expected)

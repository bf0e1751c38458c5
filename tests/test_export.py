"""Export round trip: an ssl_kit checkpoint -> safetensors -> timm.create_model, equal features."""

import json

import pytest
import pytorch_lightning as pl
import timm
import torch
from safetensors import safe_open

from ssl_kit.data import SSLDataModule
from ssl_kit.export import export
from ssl_kit.methods import MAE

from conftest import TINY_MAE


def _train_two_steps(tmp_path):
    model = MAE(**TINY_MAE)
    dm = SSLDataModule(dataset="synthetic", synthetic_size=8, batch_size=4, num_workers=0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(model, dm)
    ckpt = tmp_path / "mae.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, ckpt


def test_export_roundtrip_into_timm(tmp_path):
    model, ckpt = _train_two_steps(tmp_path)
    out = export(str(ckpt), str(tmp_path / "enc.safetensors"))
    meta = safe_open(str(out), "pt").metadata()
    assert meta["timm_model"] == "vit_tiny_patch16_224"
    kwargs = json.loads(meta["timm_kwargs"])

    loaded = timm.create_model(meta["timm_model"], pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(out)), **kwargs)
    # timm loads non-strictly when num_classes changes: check the key sets ourselves.
    reference = timm.create_model(meta["timm_model"], num_classes=0, **kwargs)
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(reference.state_dict().keys())
    missing, unexpected = reference.load_state_dict(
        {k: v for k, v in loaded.state_dict().items()}, strict=True)
    assert not missing and not unexpected

    model.eval()
    loaded.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.extract_features(x), loaded(x), atol=1e-6)


def test_export_cli_refuses_non_ssl_kit_file(tmp_path):
    from conftest import run_cli

    bogus = tmp_path / "bogus.ckpt"
    torch.save({"state_dict": {}}, bogus)
    proc = run_cli("export", str(bogus), "--output", str(tmp_path / "x.safetensors"))
    assert proc.returncode != 0
    assert "not an ssl_kit training checkpoint" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_folder_export_loads_with_timm_local_dir(tmp_path):
    """`export CKPT --output DIR/` writes timm's hub layout; timm rebuilds the encoder from the folder
    alone and its features equal load_encoder's on the checkpoint."""
    from conftest import assert_ok, run_cli
    from ssl_kit.checkpoints import load_encoder

    _, ckpt = _train_two_steps(tmp_path)
    folder = tmp_path / "vit_mae"
    proc = run_cli("export", str(ckpt), "--output", f"{folder}/")
    assert_ok(proc)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["pretrained_cfg"]["input_size"] == [3, 32, 32]

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    reference = load_encoder(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        assert torch.equal(load_encoder(folder)(x), reference(x))  # --encoder DIR reads the folder too
    # timm's resolved data config is ssl_kit's evaluation transform at the checkpoint's resolution
    data_cfg = timm.data.resolve_data_config({}, model=loaded)
    assert data_cfg["input_size"] == (3, 32, 32) and data_cfg["crop_pct"] == 0.875

    # the single-file export stays the default
    assert_ok(run_cli("export", str(ckpt)))
    assert ckpt.with_suffix(".safetensors").is_file()

"""Export round trip: an ssl_kit checkpoint -> safetensors -> timm.create_model, equal features."""

import json

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

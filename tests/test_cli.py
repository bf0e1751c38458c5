"""The user-facing command line, run for real as `python -m ssl_kit` subprocesses."""

from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_ok, run_cli

CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))

TINY_FIT = [
    "--model.model_name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "4",
    "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1", "--model.decoder_num_heads", "2",
    "--data.dataset", "synthetic", "--data.synthetic_size", "16", "--data.batch_size", "4",
    "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
    "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_config_resolves(config, capsys):
    """Full recipes resolve alone; overlays (no `model:` section, e.g. fsdp_vit.yaml) on top of mae.yaml."""
    from ssl_kit.cli import main

    is_overlay = "\nmodel:" not in "\n" + (REPO / config).read_text()
    base = ["--config", str(REPO / "configs/mae.yaml")] if is_overlay else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base, "--config", str(REPO / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: ssl_kit." in capsys.readouterr().out


@pytest.mark.slow
def test_two_step_fit_leaves_checkpoint_config_and_logs(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", "configs/demo/mae.yaml", *TINY_FIT, "--trainer.default_root_dir", str(run_dir))
    assert_ok(proc)
    assert (run_dir / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpt = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["ssl_kit"]["encoder_name"] == "vit_tiny_patch16_224"

    # A second fresh fit into the same directory must not overwrite the first run.
    again = run_cli("fit", "--config", "configs/demo/mae.yaml", *TINY_FIT, "--trainer.default_root_dir", str(run_dir))
    assert_ok(again)
    assert (tmp_path / "run-1" / "last.ckpt").is_file()
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.img_size", "30"], "img_size=30 is not divisible by patch_size=4"),
        (["--model.mask_ratio", "1.5"], "mask_ratio=1.5"),
        (["--model.model_name", "vit_nope"], "Unknown timm model name 'vit_nope'"),
        (["--data.dataset", "folder", "--data.root", "/nonexistent/images"], "/nonexistent/images"),
        (["--model.no_such_key", "1"], "no_such_key"),
        (["--model.mask_ratio", "high"], "mask_ratio"),
    ],
)
def test_bad_input_is_named_before_training(tmp_path, capsys, args, message):
    from ssl_kit.cli import main

    with pytest.raises(SystemExit) as error:
        main(["fit", "--config", str(REPO / "configs/demo/mae.yaml"), *TINY_FIT, *args,
              "--trainer.default_root_dir", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert error.value.code == 2
    assert message in captured.err
    assert not (tmp_path / "r" / "last.ckpt").exists()


def test_help_output(capsys):
    from ssl_kit.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for job in ("fit", "export", "knn", "bench"):
        assert job in out
    for job in ("validate", "test", "predict"):  # LightningCLI's, but no module implements their steps
        assert job not in out.split("\n\n")[0]
        with pytest.raises(SystemExit) as refused:
            main([job, "--config", "configs/demo/mae.yaml"])
        assert refused.value.code == 2
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--data.root", "--trainer.devices", "--checkpoint.every_n_epochs", "--ckpt_path"):
        assert option in out


def test_empty_image_folder_is_refused(tmp_path):
    from ssl_kit.data import SSLDataModule

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        SSLDataModule(root=str(tmp_path / "imgs")).check()

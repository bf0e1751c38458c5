"""Errors: one line naming the value and what is allowed, before any long work; bugs keep their traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO
from ssl_kit.errors import BadImageError, UserError, one_line

TINY = [
    "--model", "ssl_kit.methods.MAE", "--model.model_name", "test_vit", "--model.img_size", "32",
    "--model.patch_size", "4", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1",
    "--model.decoder_num_heads", "2", "--data.dataset", "synthetic", "--data.synthetic_size", "8",
    "--data.num_workers", "0", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
]


def run_main(args: list[str], capsys) -> tuple[int, str]:
    from ssl_kit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, line", [
    (["--model.mask_ratio", "high"], "error: --model.mask_ratio: expected float, got 'high'"),
    (["--data.bad_images", "ignore"], "error: --data.bad_images: expected one of 'error', 'skip', got 'ignore'"),
    (["--trainer.max_epochs", "x"], "error: --trainer.max_epochs: expected int or null, got 'x'"),
    (["--model.img_sz", "32"], "error: --model.img_sz is not an option. Did you mean img_size? "
                               "ssl_kit.methods.MAE accepts: model_name, img_size,"),
    (["--model.mask_ratio", "1.5"], "error: mask_ratio=1.5 is not allowed: it must lie strictly between 0 and 1."),
    (["--model.model_name", "vit_tinny_patch16_224"], "error: Unknown timm model name 'vit_tinny_patch16_224'. "
                                                      "Did you mean: vit_tiny_patch16_224,"),
])
def test_config_errors_are_one_line_naming_the_key_and_what_is_allowed(tmp_path, capsys, args, line):
    code, err = run_main(["fit", *TINY, *args, "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err.strip().startswith(line), err
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err and "Namespace(" not in err, err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: ssl_kit.methods.MAE\n  init_args:\n    img_size: [32\n")
    code, err = run_main(["fit", "--config", str(bad)], capsys)
    assert code == 2
    assert err.strip().startswith(f"error: {bad}: line 5, column 1: YAML syntax error"), err
    assert len(err.strip().splitlines()) == 1


def test_unknown_timm_name_suggests_close_matches():
    from ssl_kit.checkpoints.timm_names import check_timm_name

    with pytest.raises(UserError) as error:
        check_timm_name("vit_tinny_patch16_224")
    assert "Did you mean: vit_tiny_patch16_224" in str(error.value) and "sapiens" not in str(error.value)


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only UserError becomes a one-line exit 2: a ValueError from a bug propagates unchanged."""
    from ssl_kit.cli import main
    from ssl_kit.data import SSLDataModule

    def buggy_check(self):
        raise ValueError("an internal bug, not the user's mistake")

    monkeypatch.setattr(SSLDataModule, "check", buggy_check)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # the claimed, still empty directory is given back


def test_worker_errors_are_reported_by_their_original_line():
    """A DataLoader worker re-raises in the main process with its traceback in the message."""
    from torch._utils import ExceptionWrapper

    try:
        raise BadImageError("cannot read image 'x/bad.jpg': truncated (data.bad_images='error')")
    except BadImageError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(BadImageError) as error:
        wrapper.reraise()
    assert "Original Traceback" in str(error.value)
    assert one_line(error.value) == "cannot read image 'x/bad.jpg': truncated (data.bad_images='error')"


def _writes_fail_though_os_access_says_yes(path: Path) -> bool:
    try:
        open(path / ".probe", "w").close()
    except OSError:
        return os.access(path, os.W_OK)
    return False


@pytest.mark.skipif(not _writes_fail_though_os_access_says_yes(Path("/sys")),
                    reason="needs a directory where os.access says writable but creating a file fails (/sys as root)")
def test_outputs_are_proven_writable_by_creating_a_file_before_any_work(tmp_path, capsys, monkeypatch):
    import ssl_kit.evaluators.knn_job as knn_job

    def no_features(*args, **kwargs):
        raise AssertionError("features were computed before the output path was checked")

    monkeypatch.setattr(knn_job, "extract_features_sharded", no_features)
    with pytest.raises(UserError, match=r"cannot create the k-NN results in '/sys' .*pass --output"):
        knn_job.knn(encoder="resnet18", data=knn_job.EvalData(dataset="synthetic", num_workers=0),
                    output="/sys/knn.json")
    code, err = run_main(["fit", *TINY, "--trainer.default_root_dir", "/sys/ssl_kit_run"], capsys)
    assert code == 2 and err.strip().startswith("error: cannot create the run in '/sys/ssl_kit_run'"), err
    code, err = run_main(["export", str(REPO / "nothing.ckpt"), "--output", "/sys/enc.safetensors"], capsys)
    assert code == 2 and err.strip().startswith("error: cannot create the export in '/sys'"), err
    import ssl_kit.bench.job as bench

    monkeypatch.setattr(bench, "run_bench", no_features)  # the output is checked before any step runs
    code, err = run_main(["bench", "--config", str(REPO / "configs/mae.yaml"), "--output", "/sys/b.json"], capsys)
    assert code == 2 and err.strip().startswith("error: cannot create the benchmark results in '/sys'"), err

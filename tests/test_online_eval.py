"""Online probes on a separate labelled set while pretraining on unlabelled images; loggers by config."""

from __future__ import annotations

import csv
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, assert_ok, run_cli

#: A 2-step MAE fit: 8 unlabelled images at batch 4 make one epoch of 2 steps, so the probes'
#: epoch-end evaluation runs.
TINY = [
    "--model.model_name", "vit_tiny_patch16_224", "--model.img_size", "32", "--model.patch_size", "4",
    "--model.encoder_kwargs", "{embed_dim: 32, depth: 1, num_heads: 2}", "--model.decoder_embed_dim", "32", "--model.decoder_depth", "1", "--model.decoder_num_heads", "2",
    "--data.batch_size", "4", "--data.val_fraction", "0", "--data.num_workers", "0",
    "--trainer.max_epochs", "1", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
    "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    "--online_eval.batch_size", "4", "--online_eval.num_workers", "0",
]

PROBES = """
trainer:
  callbacks:
    - class_path: ssl_kit.callbacks.OnlineKNN
      init_args: {k: 3}
    - class_path: ssl_kit.callbacks.OnlineLinearProbe
    - class_path: ssl_kit.callbacks.ShowReport
      init_args: {num_images: 4, max_points: 8}
"""


def _write_images(folder, n: int, seed: int, ext: str) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")


@pytest.fixture
def data(tmp_path):
    """Unlabelled pretraining images (no class folders) and a labelled train/val set of 2 classes."""
    _write_images(tmp_path / "unlabelled", 8, 0, "jpg")
    for split, n in (("train", 6), ("val", 3)):
        for c, cls in enumerate(("cat", "dog")):
            _write_images(tmp_path / "labelled" / split / cls, n, 10 * c + len(split), "png")
    (tmp_path / "probes.yaml").write_text(PROBES)
    return tmp_path


def _fit(data, run_dir, *extra, env=None):
    return run_cli("fit", "--config", "configs/demo/mae.yaml", "--config", str(data / "probes.yaml"), *TINY,
                   "--data.dataset", "folder", "--data.root", str(data / "unlabelled"),
                   "--online_eval.root", str(data / "labelled" / "train"),
                   "--online_eval.val_root", str(data / "labelled" / "val"),
                   "--trainer.default_root_dir", str(run_dir), *extra, env=env)


def _csv_metrics(run_dir) -> dict[str, list[float]]:
    metrics: dict[str, list[float]] = {}
    for row in csv.DictReader(open(next(run_dir.rglob("metrics.csv")))):
        for key, value in row.items():
            if value:
                metrics.setdefault(key, []).append(float(value))
    return metrics


@pytest.mark.slow
def test_online_probes_on_a_separate_labelled_set(data):
    run_dir = data / "run"
    csv_logger = ["--trainer.logger", "pytorch_lightning.loggers.CSVLogger", "--trainer.logger.save_dir", "."]
    proc = _fit(data, run_dir, *csv_logger)
    assert_ok(proc)
    assert "skipped" not in proc.stderr  # neither probe fell back to the (unlabelled) pretraining data
    metrics = _csv_metrics(run_dir)  # save_dir "." follows the run directory
    for key in ("knn_top1", "knn_top5", "linear_top1", "linear_top5"):
        assert len(metrics[key]) == 1 and 0 <= metrics[key][0] <= 100, key
    assert metrics["knn_top5"][0] == 100.0  # 2 classes: the top 5 always hold the right one
    assert len(metrics["train/linear_loss"]) == 2  # one probe step per training step
    head = torch.load(run_dir / "last.ckpt", weights_only=True)["callbacks"]["OnlineLinearProbe"]["head"]
    assert head["1.weight"].shape == (2, 32)  # 2 classes of the labelled set, the encoder's width
    # no validation split (val_fraction 0): the end-of-run pictures are of the training images
    assert f"pictures of the encoder written to {run_dir / 'report' / 'report.html'}" in proc.stdout
    assert "8 images, 32-d pooled features, no labels" in (run_dir / "report" / "report.html").read_text()

    # without --online_eval the probes see unlabelled data: they say so and skip, training goes on
    proc = run_cli("fit", "--config", "configs/demo/mae.yaml", "--config", str(data / "probes.yaml"), *TINY,
                   "--data.dataset", "folder", "--data.root", str(data / "unlabelled"),
                   "--trainer.default_root_dir", str(data / "run_unlabelled"), *csv_logger)
    assert_ok(proc)
    assert "OnlineKNN: the data has no labels" in proc.stderr
    assert "OnlineLinearProbe: no labelled data" in proc.stderr


@pytest.mark.slow
def test_online_eval_folder_without_labels_is_one_line_before_training(data):
    proc = _fit(data, data / "run", "--online_eval.val_root", str(data / "unlabelled"),
                "--online_eval.root", str(data / "unlabelled"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: online_eval:") and "has no labels" in lines[-1], proc.stderr[-3000:]
    assert not (data / "run" / "last.ckpt").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install -e '.[wandb]')")
def test_wandb_example_config_logs_offline(data):
    run_dir = data / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(data / "wandb_default"),
               WANDB_BASE_URL="http://127.0.0.1:9")  # nothing can be sent anywhere
    proc = _fit(data, run_dir, "--config", "configs/wandb.yaml", env=env)
    assert_ok(proc)
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list(run_dir.rglob("*"))[:20]  # save_dir "." means the run directory
    records = next(offline[0].glob("run-*.wandb")).read_bytes()  # what `wandb sync` would upload
    for key in (b"knn_top1", b"linear_top1", b"train/loss"):  # metric names are stored as plain strings
        assert key in records, key
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard still beside it
    assert not (data / "wandb_default").exists()

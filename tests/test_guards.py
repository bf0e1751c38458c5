"""Guards around evaluation and monitoring: the default fine-tune augmentation cannot crash,
``aggregate`` only combines seeds of one experiment and reports n=1 honestly, and reconstruction
grids leave the process's random stream alone."""

from __future__ import annotations

import inspect
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_MAE
from ssl_kit.errors import UserError
from ssl_kit.evaluators.finetune import FineTune, posterize_zero_safe
from ssl_kit.evaluators.results import aggregate, format_summary, seed_summary, write_results


# --- fine-tune augmentation -------------------------------------------------------------------
def default_recipe_transform(img_size: int = 32):
    """``FineTune.train_transform`` with the constructor's default recipe."""
    defaults = {k: p.default for k, p in inspect.signature(FineTune.__init__).parameters.items()}
    assert defaults["auto_augment"] == "rand-m9-mstd0.5-inc1"
    hparams = SimpleNamespace(**{k: defaults[k] for k in ("crop_scale", "auto_augment", "color_jitter", "re_prob")})
    return FineTune.train_transform(SimpleNamespace(hparams=hparams, img_size=img_size))


def test_default_finetune_augmentation_survives_many_random_images():
    """RandAugment(9, 0.5) with magnitude noise asks posterize for 0 bits at magnitude 10; Pillow 13
    raises on that (6 of these 3,000 draws did before the guard)."""
    transform = default_recipe_transform()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)) for _ in range(50)]
    for i in range(3000):
        out = transform(images[i % 50])
        assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def test_zero_bit_posterize_is_a_black_image_as_in_the_reference():
    img = Image.new("RGB", (4, 4), (200, 100, 50))
    assert posterize_zero_safe(img, 0).getpixel((0, 0)) == (0, 0, 0)
    assert posterize_zero_safe(img, 1).getpixel((0, 0)) == (128, 0, 0)


# --- aggregate --------------------------------------------------------------------------------
def result(root, name, seed, top1, protocol="finetune", encoder="runs/mae/last.ckpt", lr=None):
    run = root / name
    write_results(run / f"{protocol}.json", {"protocol": protocol, "encoder": encoder,
                                             "final": {"per_seed": {str(seed): {"top1": top1, "top5": 90.0}}}})
    if lr is not None:
        (run / "config.yaml").write_text(f"# started at global step 0\nseed_everything: {seed}\n"
                                         f"trainer:\n  default_root_dir: {run}\nmodel:\n  init_args:\n    lr: {lr}\n")


@pytest.mark.parametrize("odd, message", [
    (dict(protocol="linear"), "protocol differs"),
    (dict(encoder="resnet18"), "encoder differs"),
    (dict(lr=0.1), "config model.init_args.lr differs"),
])
def test_aggregate_refuses_runs_of_different_experiments(tmp_path, odd, message):
    result(tmp_path, "seed0", 0, 80.0, lr=0.5)
    result(tmp_path, "seed1", 1, 81.0, lr=0.5)  # seed and run directory differ: that is fine
    assert aggregate(str(tmp_path))["top1"]["n"] == 2
    result(tmp_path, "seed2", 2, 8.0, **{"lr": 0.5, **odd})
    with pytest.raises(UserError, match=f"cannot combine .*seed2.*: {message}"):
        aggregate(str(tmp_path))


def test_a_single_seed_has_no_std(tmp_path, capsys):
    summary = seed_summary({0: {"top1": 75.3, "top5": 90.0}})
    assert summary["top1"] == {"mean": 75.3, "std": None, "n": 1}
    text = format_summary("one run", summary)
    assert "75.30  (1 seed: no std)" in text and "±" not in text
    result(tmp_path, "seed0", 0, 75.3)
    aggregate(str(tmp_path))
    assert json.loads((tmp_path / "seeds.json").read_text())["final"]["top1"]["std"] is None


# --- reconstruction grids ---------------------------------------------------------------------
class _Experiment:
    def __init__(self) -> None:
        self.images = []

    def add_image(self, tag, grid, global_step) -> None:
        self.images.append(grid)


def test_reconstruction_grid_leaves_the_global_rng_untouched():
    """It runs on rank 0 only: drawing its masks from the global RNG would make rank 0's later
    draws differ from an uninterrupted (or other-rank) run."""
    from ssl_kit.callbacks import ReconstructionGrid
    from ssl_kit.data import SSLDataModule
    from ssl_kit.methods import MAE

    model = MAE(**{**TINY_MAE, "model_name": "test_vit"})
    dm = SSLDataModule(dataset="synthetic", synthetic_size=8, image_size=32, num_workers=0)
    dm.set_transforms(None, model.eval_transform())
    experiment = _Experiment()
    trainer = SimpleNamespace(datamodule=dm, logger=SimpleNamespace(experiment=experiment), is_global_zero=True,
                              current_epoch=4, global_step=10)
    grid = ReconstructionGrid(every_n_epochs=5, num_images=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    grid.on_train_epoch_end(trainer, model)
    assert torch.equal(torch.get_rng_state(), state)
    grid.on_train_epoch_end(trainer, model)  # its own seeded stream: the same masks again
    assert len(experiment.images) == 2 and torch.equal(experiment.images[0], experiment.images[1])
    assert model.training  # eval mode only for the grid

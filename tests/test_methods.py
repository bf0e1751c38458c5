"""The method contract (``SSLMethod``'s docstring, docs/adding_a_method.md), checked for every
method of the tiny zoo (``tests/method_zoo.py``: a new method is one entry there).

* ``extract_features`` maps (B, C, H, W) to (B, D), D = ``encoder.num_features``;
* ``train_transform()`` returns a list of views and ``example_batch`` has exactly their shapes,
  so ``bench`` works for every method; one real Lightning training step runs on it;
* ``export`` then ``load_encoder`` give the features ``extract_features`` gives, bitwise;
* ``fp16_safe`` is declared by the method itself;
* every random draw of a training step comes from the step generator: given it, or made under
  the global RNG forked and seeded from it (kornia's, in ReLICv2's batched photometric step), so
  the step leaves the global RNG as it found it, draws the same under any global RNG state and
  differently at another step, and 2 gloo processes with batch b draw exactly what 1 process with
  batch 2b draws (the 2-process check is marked slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when run as a script (the DDP workers)

from conftest import REPO, assert_ok  # noqa: E402
from method_zoo import ALL_DRAWS, NO_STEP_DRAWS, ZOO, build, method_class, teacher_file  # noqa: E402

NAMES = sorted(ZOO)

#: torch functions and tensor methods that draw random numbers (dropout only when it drops).
RANDOM_OPS = {
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial",
    "normal", "poisson", "uniform_", "normal_", "bernoulli_", "random_", "exponential_", "cauchy_", "log_normal_",
    "geometric_", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
}


class RandomDraws(TorchFunctionMode):
    """Records every random draw made under it as (op name, output, whether it was given a
    ``generator``). A draw without one is from the global RNG, or from a fork of it seeded in the step."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, torch.Tensor, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in RANDOM_OPS and not _inactive_dropout(name, args, kwargs):
            self.draws.append((name, out.detach().clone(), kwargs.get("generator") is not None))
        return out


def _inactive_dropout(name: str, args: tuple, kwargs: dict) -> bool:
    if "dropout" not in name:
        return False
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    return p == 0 or not training


def fake_trainer(world: int = 1, rank: int = 0, step: int = 3) -> SimpleNamespace:
    """What a training step reads from its trainer (world size, rank, step, micro-batch)."""
    return SimpleNamespace(
        world_size=world, global_rank=rank, global_step=step, current_epoch=0, accumulate_grad_batches=1, training=True,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_idx=step)), estimated_stepping_batches=10,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


def step_draws(name: str, batch_size: int, world: int = 1, rank: int = 0, global_seed: int = 0, step: int = 3) -> dict:
    """One training step of a zoo method (at ``step`` of a fake run) under :class:`RandomDraws`,
    from the batch as it reaches the device (``on_after_batch_transfer``, e.g. ReLICv2's batched
    photometric step) to the loss.

    The global RNG is seeded with ``global_seed`` just before the step: a step that draws from it
    depends on it. Returns the loss, the draws and whether the global RNG was left as it was.
    """
    model = build(name, **ALL_DRAWS.get(name, {})).train()
    batch = model.example_batch(batch_size)
    model._trainer = fake_trainer(world, rank, step)
    model.log_step = lambda *args, **kwargs: None  # logging needs a real trainer; it draws nothing
    os.environ["PL_GLOBAL_SEED"] = "0"
    torch.manual_seed(global_seed)
    before = torch.get_rng_state()
    with RandomDraws() as draws:
        loss = model.training_step(model.on_after_batch_transfer(batch, 0), 0)
    return {"loss": loss.detach(), "draws": draws.draws, "rng_kept": torch.equal(before, torch.get_rng_state())}


def assert_same_draws(found: list, want: list, what: str) -> None:
    """The same ops drew the same values, in the same order."""
    assert [op for op, _, _ in found] == [op for op, _, _ in want], what
    for i, ((op, got, seeded), (_, expected, _)) in enumerate(zip(found, want)):
        how = "" if seeded else " (no generator given)"
        assert torch.equal(got, expected), f"{what}: draw {i}, {op}{how}, differs"


# --- shapes, views and the bench step ---------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_extract_features_is_one_vector_per_image(name):
    model = build(name).eval()
    size = model.img_size
    with torch.no_grad():
        features = model.extract_features(torch.randn(3, 3, size, size))
    assert features.shape == (3, model.encoder.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_example_batch_has_the_shapes_of_the_train_views(name):
    model = build(name)
    rng = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2 * model.img_size, 2 * model.img_size, 3), generator=rng, dtype=torch.uint8)
    views = model.train_transform()(Image.fromarray(pixels.numpy()))
    assert isinstance(views, list) and views and all(isinstance(v, torch.Tensor) for v in views)
    batch, labels = model.example_batch(5)
    assert isinstance(batch, list) and [tuple(b.shape) for b in batch] == [(5, *v.shape) for v in views]
    assert labels.shape == (5,)


@pytest.mark.parametrize("name", NAMES)
def test_one_bench_step_on_the_example_batch(name):
    from ssl_kit.bench.steps import fit_steps

    model = build(name)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    fit_steps(model, model.example_batch(2), 2, 1, torch.device("cpu"), "32-true", [])
    after = model.encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_relicv2_example_batch_is_its_multi_crop():
    """The bug this contract fixed: ReLICv2's example batch was one tensor split into B "views"."""
    batch, _ = build("relicv2").example_batch(4)
    assert [tuple(v.shape) for v in batch] == [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 16, 16)]


@pytest.mark.slow
def test_bench_cli_runs_a_multi_crop_config(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ssl_kit", "bench", "--config", "configs/demo/relicv2.yaml", "--data.batch_size", "4",
         "--steps", "2", "--warmup_steps", "1", "--trainer.precision", "32-true", "--output", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=600)
    assert_ok(proc)
    result = json.loads(out.read_text())
    assert result["method"] == "ReLICv2" and result["img_per_s"] > 0 and result["flops_per_img"] > 0


# --- weights and precision ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_export_then_load_encoder_gives_identical_features(name, tmp_path):
    from ssl_kit.callbacks import SafeCheckpointIO
    from ssl_kit.checkpoints import load_encoder
    from ssl_kit.export import export

    model = build(name).eval()
    checkpoint = {"state_dict": model.state_dict(), "global_step": 0}
    model.on_save_checkpoint(checkpoint)
    SafeCheckpointIO().save_checkpoint(checkpoint, tmp_path / "last.ckpt")
    exported = export(str(tmp_path / "last.ckpt"), str(tmp_path / "encoder.safetensors"))
    x = torch.randn(2, 3, model.img_size, model.img_size)
    with torch.no_grad():
        expected = model.extract_features(x)
        for source in (exported, tmp_path / "last.ckpt"):
            assert torch.equal(load_encoder(source)(x), expected), source


@pytest.mark.parametrize("name", NAMES)
def test_fp16_safety_is_declared_by_the_method(name):
    cls = method_class(name)
    assert isinstance(cls.__dict__.get("fp16_safe"), bool), f"{cls.__name__} must declare fp16_safe"


def test_pixel_regressors_are_not_fp16_safe():
    assert method_class("mae").fp16_safe is False and method_class("fcmae").fp16_safe is False


# --- randomness ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_draws_only_from_the_step_generator(name):
    first = step_draws(name, 4, global_seed=0)
    assert first["rng_kept"], f"{name}'s step moved the global RNG: it draws from it"
    if name in NO_STEP_DRAWS:
        assert first["draws"] == [], f"{name} is listed as drawing nothing in its step"
        return
    assert any(seeded for _, _, seeded in first["draws"]), f"{name}: the step generator drew nothing"
    again = step_draws(name, 4, global_seed=1)  # another global RNG state: the same step
    assert_same_draws(again["draws"], first["draws"], f"{name} under another global RNG state")
    assert torch.equal(first["loss"], again["loss"])
    later = step_draws(name, 4, step=4)  # seeded by the step, not by a constant
    for seeded in (True, False):
        now, then = ([v for _, v, s in r["draws"] if s == seeded] for r in (first, later))
        assert not now or any(not torch.equal(a, b) for a, b in zip(now, then)), f"{name}: step 4 drew as step 3"


def test_draw_global_keeps_each_ranks_rows_of_the_global_draw():
    model = build("mae").train()
    draw = lambda n, g: torch.rand(n, 5, generator=g)  # noqa: E731
    model._trainer = fake_trainer(world=1)
    whole = model.draw_global(draw, 6, "cpu")
    parts = []
    for rank in range(2):
        model._trainer = fake_trainer(world=2, rank=rank)
        parts.append(model.draw_global(draw, 3, "cpu"))
    assert torch.equal(torch.cat(parts), whole)
    model._trainer = fake_trainer(world=1, step=4)
    assert not torch.equal(model.draw_global(draw, 6, "cpu"), whole)
    # Nested draws (ReLICv2's kornia parameters: views x ops x {name: tensor}) keep their structure.
    nested = lambda n, g: [{"a": torch.rand(n, 2, generator=g)}, (torch.rand(n, generator=g),)]  # noqa: E731
    model._trainer = fake_trainer(world=2, rank=1)
    mine, whole = model.draw_global(nested, 3, "cpu"), nested(6, model.step_generator("cpu"))
    assert isinstance(mine, list) and list(mine[0]) == ["a"] and isinstance(mine[1], tuple)
    assert torch.equal(mine[0]["a"], whole[0]["a"][3:]) and torch.equal(mine[1][0], whole[1][0][3:])


def _ddp_worker(rank: int, world: int, port: int, batch_size: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:  # a rank-dependent global RNG: a draw from it would differ between the ranks
        results = {name: step_draws(name, batch_size, world, rank, global_seed=100 + rank) for name in NAMES}
        torch.save({n: {"draws": r["draws"], "rng_kept": r["rng_kept"]} for n, r in results.items()},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_draw_what_one_process_with_the_global_batch_draws(tmp_path):
    b = 2
    teacher_file()  # made once, before the workers race for it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, __file__, str(port), str(b), str(tmp_path)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in NAMES:
        one = step_draws(name, 2 * b)
        assert bool(one["draws"]) != (name in NO_STEP_DRAWS) and one["rng_kept"], name
        for rank, found in enumerate(ranks):
            assert found[name]["rng_kept"], f"{name} rank {rank} moved the global RNG"
            assert_same_draws(found[name]["draws"], one["draws"], f"{name} rank {rank} against 1 process")


if __name__ == "__main__":  # the 2-process run of the test above: PORT BATCH_SIZE OUT_DIR
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]), nprocs=2)

"""`python -m ssl_kit bench`: positive figures, JSON output, FLOPs against an analytic count; the
benchmarks' timer; every ``python -m ssl_kit.bench.NAME`` benchmark runs at a tiny size."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, assert_ok
from ssl_kit.cli import main

TINY_OVERRIDES = [
    "--data.batch_size", "4", "--steps", "3", "--warmup_steps", "1",
    "--model.init_args.decoder_embed_dim", "64", "--model.init_args.decoder_depth", "1",
    "--model.init_args.decoder_num_heads", "2", "--trainer.precision", "32-true",
]


@pytest.fixture
def one_thread():
    # Under CPU contention, 2 OpenMP threads on 2 shared cores run ~20x slower than 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mae_train_step_flops(model) -> float:
    """Analytic matmul FLOPs of one MAE training step per image (forward + backward).

    Linear layers: 2*N*in*out forward, twice that backward (input and weight gradients);
    attention: 4*N^2*D forward (QK^T and AV), twice that backward. The patch embedding's input
    needs no gradient, so its backward is one weight gradient only.
    """
    enc, dec = model.encoder, model.decoder
    D, L, n_prefix = enc.embed_dim, model.grid[0] * model.grid[1], enc.num_prefix_tokens
    P = model.patch_size**2 * 3
    mlp = enc.blocks[0].mlp.fc1.out_features // D
    K = int(L * (1 - model.mask_ratio))
    Dd, N_enc, N_dec = dec.embed.out_features, n_prefix + K, n_prefix + L

    def blocks(n_tokens, width, depth, ratio):
        per_block = 2 * n_tokens * width * width * (3 + 1 + 2 * ratio) + 4 * n_tokens**2 * width
        return depth * per_block

    patch = 2 * L * P * D
    forward = (
        patch + blocks(N_enc, D, len(enc.blocks), mlp)
        + 2 * N_enc * D * Dd + blocks(N_dec, Dd, len(dec.blocks), 4) + 2 * L * Dd * P
    )
    return 3 * forward - patch


def test_bench_cpu_figures_and_flops_match_analytic(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    main(["bench", "--config", str(REPO / "configs/demo/mae.yaml"), *TINY_OVERRIDES, "--output", str(out)])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "img/s" in printed and "MFU" in printed and str(out) in printed
    for key in ("img_per_s", "step_time_s", "flops_per_img", "achieved_tflops", "peak_tflops", "mfu", "peak_memory_gib"):
        assert result[key] > 0, (key, result[key])
    assert result["device"] == "cpu" and result["precision"] == "32-true" and result["batch_size"] == 4
    assert result["peak_source"].startswith("measured float32 matmul")
    assert result["img_per_s"] == pytest.approx(4 / result["step_time_s"])
    assert result["achieved_tflops"] == pytest.approx(result["flops_per_img"] * 4 / result["step_time_s"] / 1e12)
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
    assert result["mfu"] <= 1.0  # a tiny ViT on CPU is far from the measured matmul peak

    from ssl_kit.methods import MAE

    model = MAE("vit_tiny_patch16_224", img_size=32, patch_size=4, decoder_embed_dim=64, decoder_depth=1,
                decoder_num_heads=2, encoder_kwargs=dict(embed_dim=128, depth=6, num_heads=4))  # the demo's ViT
    expected = mae_train_step_flops(model)
    assert result["flops_per_img"] == pytest.approx(expected, rel=0.05)


class VirtualClock:
    """``perf_counter`` for the benchmarks' timer: a training step takes 10 s, each reading 1 ms."""

    def __init__(self) -> None:
        self.steps = self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return 10.0 * self.steps + 1e-3 * self.reads


def test_bench_figures_follow_the_clock(tmp_path, monkeypatch, one_thread):
    """With a clock where every training step takes 10 s, the timed steps (3 steps, 1 warm-up)
    take 10 s each: img/s = batch / 10, achieved = FLOPs x batch / 10 s, MFU = achieved / peak,
    and the peak is the matmul's 2 n^3 FLOPs over its (1 ms) best time."""
    from types import SimpleNamespace

    import ssl_kit.bench.job
    import ssl_kit.bench.timer
    from ssl_kit.methods import MAE

    clock = VirtualClock()
    monkeypatch.setattr(ssl_kit.bench.timer, "time", SimpleNamespace(perf_counter=clock.perf_counter,
                                                                      process_time=lambda: 0.0))
    step = MAE.training_step

    def timed_step(self, *args):
        clock.steps += 1
        return step(self, *args)

    monkeypatch.setattr(MAE, "training_step", timed_step)
    monkeypatch.setattr(ssl_kit.bench.job, "measured_matmul_tflops", functools.partial(
        ssl_kit.bench.job.measured_matmul_tflops, n=256, repeats=2))  # the clock, not the matmul, sets the time
    out = tmp_path / "bench.json"
    main(["bench", "--config", str(REPO / "configs/demo/mae.yaml"), *TINY_OVERRIDES, "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["timed_steps"] == 2
    assert result["step_time_s"] == pytest.approx(10.0, rel=1e-3)  # not 20 / 3 or 30 / 2
    assert result["img_per_s"] == pytest.approx(4 / result["step_time_s"])
    assert result["peak_tflops"] == pytest.approx(2 * 256**3 * 2 / 1e-3 / 1e12)  # 2 matmuls in 1 ms
    assert result["achieved_tflops"] == pytest.approx(result["flops_per_img"] * 4 / result["step_time_s"] / 1e12)
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"]) and result["mfu"] <= 1


def test_bench_rejects_steps_not_above_warmup(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["bench", "--config", str(REPO / "configs/demo/mae.yaml"), "--steps", "2", "--warmup_steps", "2",
              "--output", str(tmp_path / "b.json")])
    assert error.value.code == 2
    assert "--steps 2 must exceed --warmup_steps 2" in capsys.readouterr().err


def test_example_batch_is_a_list_of_one_view_for_mae(tiny_mae):
    views, labels = tiny_mae.example_batch(3, "cpu")
    assert [v.shape for v in views] == [(3, 3, 32, 32)] and labels.shape == (3,)


# --- the benchmarks' one timer ------------------------------------------------------------------
class FakeClock:
    """``time`` for ``ssl_kit.bench.timer``: the work advances it; the CPU clock runs at half speed."""

    def __init__(self) -> None:
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t

    def process_time(self) -> float:
        return self.t / 2


@pytest.fixture
def fake_clock(monkeypatch):
    import ssl_kit.bench.timer

    clock = FakeClock()
    monkeypatch.setattr(ssl_kit.bench.timer, "time", clock)
    return clock


def test_interleaved_excludes_warmup_and_the_median_ignores_an_outlier(fake_clock):
    from ssl_kit.bench.timer import interleaved, median

    durations = {"a": iter([100.0, 1.0, 5.0, 2.0]), "b": iter([100.0, 3.0, 3.0, 90.0])}  # first call: warm-up
    calls = []

    def work(name):
        def fn():
            calls.append(name)
            fake_clock.t += next(durations[name])
        return fn

    times = interleaved({"a": work("a"), "b": work("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then round by round
    assert [t.wall for t in times["a"]] == [1.0, 5.0, 2.0] and [t.wall for t in times["b"]] == [3.0, 3.0, 90.0]
    assert median(times["a"]).wall == 2.0 and median(times["b"]).wall == 3.0  # not the means 2.67 / 32
    assert median(times["a"]).cpu == 1.0


def test_interleaved_repeats_each_callable_within_a_round(fake_clock):
    from ssl_kit.bench.timer import interleaved

    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, repeats=2,
                        warmup=0)
    assert calls == ["a", "a", "b", "b"] * 2 and [len(t) for t in times.values()] == [4, 4]


def test_step_timer_times_steps_after_warmup_and_the_span(fake_clock):
    from ssl_kit.bench.timer import Seconds, StepTimer

    timer = StepTimer(warmup=2)
    for batch_idx, seconds in enumerate([50.0, 40.0, 1.0, 2.0, 3.0]):
        timer.on_train_batch_start(None, None, None, batch_idx)
        fake_clock.t += seconds  # the step
        timer.on_train_batch_end(None, None, None, None, batch_idx)
        fake_clock.t += 0.5  # Lightning's work between steps: in the span, not in a step
    assert timer.steps == [Seconds(1.0, 0.5), Seconds(2.0, 1.0), Seconds(3.0, 1.5)]
    assert timer.span == Seconds(7.0, 3.5)


# --- the benchmarks at a tiny size ---------------------------------------------------------------
def run_benchmark(name: str, *args: str) -> str:
    """``python -m ssl_kit.bench.NAME ARGS`` in a subprocess (one thread); returns its stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", f"ssl_kit.bench.{name}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    return proc.stdout


def figures(line_start: str, unit: str, out: str) -> list[float]:
    """The numbers before ``unit`` on the printed lines that start with ``line_start``."""
    lines = [line for line in out.splitlines() if line.strip().startswith(line_start)]
    return [float(x) for line in lines for x in re.findall(rf"([0-9.]+) {unit}", line)]


@pytest.mark.slow
def test_fcmae_benchmark_times_every_mode():
    out = run_benchmark("fcmae", "--model_name", "convnextv2_atto", "--img_size", "64", "--batch_size", "2",
                        "--decoder_embed_dim", "64", "--rounds", "2", "--steps_per_round", "1", "--threads", "1")
    for mode in ("sparse", "dense", "dense_cl", "dense_masked"):
        ms, = figures(mode + " ", "ms/step", out)
        assert ms > 0, out
    assert re.search(r"sparse / dense(_cl)? step time: [0-9.]+x", out), out


@pytest.mark.slow
def test_eva_benchmark_splits_the_real_step(tmp_path):
    from test_eva import TINY_CLIP

    clip = tmp_path / "tiny-clip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    out = run_benchmark("eva", "--student", "vit_tiny_patch16_224", "--teacher", str(clip), "--img_size", "32",
                        "--patch_size", "4", "--batch_size", "2", "--steps", "2")
    (teacher,), (rest,), (step,) = (figures(part, "ms", out) for part in ("teacher", "rest", "step"))
    assert 0 < teacher < step and rest == pytest.approx(step - teacher, abs=0.2), out  # printed to 0.1 ms
    assert figures("step", "img/s", out)[0] > 0, out


@pytest.mark.slow
def test_relicv2_benchmark_times_the_step_and_the_augmentation():
    out = run_benchmark("relicv2", "--batch_size", "4", "--steps", "2", "--aug_images", "4", "--threads", "1")
    assert figures("train step", "ms wall", out)[0] > 0 and figures("train step", "ms process CPU", out)[0] > 0, out
    assert figures("multi-crop", "img/s wall", out)[0] > 0 and figures("kornia", "img/s wall", out)[0] > 0, out


def test_knn_benchmark_finds_the_same_neighbours(capsys):
    from ssl_kit.bench import knn

    knn.main(bank=500, queries=50, dim=16, k=5, classes=5)
    out = capsys.readouterr().out
    assert "identical neighbour lists: 100.00% of queries" in out
    assert len(figures("faiss", "s", out) + figures("torch", "s", out)) == 2


def test_linear_benchmark_times_both_modes(one_thread):
    from ssl_kit.bench import linear

    times = linear.main(img_size=32, images=20, epochs=1, batch_size=8, seeds=1, workers=0)
    assert set(times) == {"uncached", "cached"} and all(t > 0 for t in times.values())


def test_data_benchmark_rates_every_path(tmp_path, one_thread):
    from ssl_kit.bench import data

    result = data.main(images=6, rounds=1, batch_size=2, size=32, long_side=80, workdir=str(tmp_path))
    assert len(result["img_per_cpu_s"]) == 5 and all(r > 0 for r in result["img_per_cpu_s"].values())

"""The demos and their report: fair baselines, the raw-pixel row, and the `demo` job end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TINY_MAE, assert_ok, run_cli
from ssl_kit.callbacks.report import EvalReport, format_report
from ssl_kit.data import SSLDataModule
from ssl_kit.demo import README_END, README_START, _with_teachers, find_demos, paste_into_readme
from ssl_kit.errors import UserError
from ssl_kit.evaluators.batchnorm import recalibrate_batchnorm
from ssl_kit.views import EvalTransform


def _digits_like(n: int = 64, size: int = 32) -> SSLDataModule:
    dm = SSLDataModule(dataset="synthetic", synthetic_size=n, image_size=size, val_fraction=0.25, batch_size=8,
                       num_workers=0)
    dm.set_transforms(None, EvalTransform(size))
    return dm


def test_batchnorm_recalibration_changes_running_stats_and_nothing_else():
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n = recalibrate_batchnorm(net, _digits_like().eval_dataloader("train"))
    after = net.state_dict()
    assert n == 20 and not net.training
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # every layer re-estimated
    weights = [k for k in after if k.endswith(("weight", "bias"))]
    assert all(torch.equal(before[k], after[k]) for k in weights)
    # The estimate is the plain average over the loader: the first BN's mean is the mean conv1 output.
    imgs = torch.cat([x for x, _ in _digits_like().eval_dataloader("train")])
    with torch.no_grad():
        mean = net.conv1(imgs).mean(dim=(0, 2, 3))
    assert torch.allclose(net.bn1.running_mean, mean, atol=1e-5)


def test_recalibration_leaves_a_model_without_batchnorm_untouched():
    net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batchnorm(net, _digits_like().eval_dataloader("train")) == 0
    assert not calls and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_raw_pixels_row_scores_100_where_pixels_separate_the_classes():
    """Synthetic classes differ by colour: the pixel baseline must find that, k-NN and linear."""
    report = EvalReport(k=5, linear_epochs=30, linear_lr=5.0)
    dm = _digits_like()
    scores = report.frozen_scores(lambda x: x.flatten(1), SimpleNamespace(device=torch.device("cpu")), dm)
    assert scores["knn"]["top1"] == 100.0 and scores["linear"]["top1"] == 100.0


def test_raw_pixels_are_area_resized_to_at_most_pixels_size():
    x = torch.arange(2 * 3 * 8 * 16, dtype=torch.float32).view(2, 3, 8, 16)
    small = EvalReport(pixels_size=4).pixels(x)
    assert torch.equal(small, F.avg_pool2d(x, 4).flatten(1))  # 8x16 -> 2x4: longest side 4
    assert torch.equal(EvalReport(pixels_size=16).pixels(x), x.flatten(1))  # already small enough: as it is
    assert torch.equal(EvalReport(pixels_size=None).pixels(x), x.flatten(1))
    with pytest.raises(UserError, match="pixels_size=0"):
        EvalReport(pixels_size=0)


def test_random_baseline_is_a_fresh_encoder_not_the_trained_one():
    from ssl_kit.methods import MAE

    torch.manual_seed(0)
    trained = MAE(**TINY_MAE)
    with torch.no_grad():
        trained.encoder.blocks[0].attn.qkv.weight.add_(1.0)  # stands in for training
    fresh = EvalReport(seed=3).random_init_encoder(trained, _digits_like())
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, trained.encoder.blocks[0].attn.qkv.weight)
    again = EvalReport(seed=3).random_init_encoder(trained, _digits_like())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), again.state_dict().values()))
    twin = EvalReport.with_encoder(trained, fresh)
    assert twin.encoder is fresh and trained.encoder is not fresh  # the trained module is left alone


def test_format_report_lists_every_row_and_protocol():
    scores = {"knn": {"top1": 90.0, "top5": 99.0}, "linear": {"top1": 95.0, "top5": 99.5}}
    results = {"protocol": {"k": 20, "temperature": 0.07}, "pretrained": {**scores, "finetune": scores["knn"]},
               "random_init": scores, "pixels": scores}
    text = format_report(results)
    assert "fine-tune" in text and "pixels" in text and text.count("90.00") == 4


@pytest.mark.slow
def test_demo_job_runs_every_demo_and_writes_the_table_from_the_runs(tmp_path):
    """Every demo config through the real `demo` job (2 training steps each on a small synthetic
    set): every run writes eval.json with the three rows, EVA reads the MAE run as its teacher, and
    results.md / results.json are made from those files."""
    fit_args = ["--trainer.max_steps=2", "--trainer.max_epochs=1", "--data.dataset=synthetic",
                "--data.synthetic_size=48", "--data.batch_size=8", "--data.num_workers=0",
                "--trainer.enable_progress_bar=false"]
    proc = run_cli("demo", "--output", str(tmp_path), "--fit_args", json.dumps(fit_args), timeout=900)
    assert_ok(proc)
    results = json.loads((tmp_path / "results.json").read_text())
    runs = {r["demo"]: r for r in results["runs"]}
    demos = find_demos()
    assert sorted(runs) == sorted(demos) and list(runs).index("mae") < list(runs).index("eva")
    for name, r in runs.items():
        saved = json.loads((tmp_path / name / "eval.json").read_text())
        for row in ("pretrained", "random_init", "pixels"):
            assert saved[row]["knn"]["top1"] == r[row]["knn"]["top1"]
            assert "linear" in saved[row]
    assert "finetune" in runs["fcmae"]["pretrained"] and "finetune" in runs["fcmae"]["random_init"]
    eva_ckpt = torch.load(tmp_path / "eva" / "last.ckpt", weights_only=True)
    assert eva_ckpt["ssl_kit"]["teacher"]["checkpoint"] == str(tmp_path / "mae" / "last.ckpt")
    table = (tmp_path / "results.md").read_text()
    mae_knn = runs["mae"]["pretrained"]["knn"]["top1"]
    assert f"{mae_knn:.1f}" in table and table.count("| `configs/demo/") == len(demos)
    assert f"[{len(demos)}/{len(demos)}]" in proc.stdout
    for name in runs:  # every demo ends with its pictures (ShowReport) and prints the page's path
        page = tmp_path / name / "report" / "report.html"
        assert f"pictures of the encoder written to {page}" in proc.stdout
        assert (page.parent / "pca.png").is_file() and (page.parent / "embedding.png").is_file()
        assert (page.parent / "reconstructions.png").is_file() == (name in ("mae", "fcmae"))
        assert "eval.json" in page.read_text() and "knn top-1" in page.read_text()


def test_demo_job_refuses_an_unknown_demo(tmp_path):
    proc = run_cli("demo", "--methods", "[mae,dino2]", "--output", str(tmp_path))
    assert proc.returncode == 2 and "dino2" in proc.stderr and "choose from" in proc.stderr


def test_demo_configs_are_discovered_and_teachers_run_first(tmp_path, monkeypatch):
    """A new ``configs/demo/<name>.yaml`` is a demo by itself; a config naming another demo's run as
    its teacher is run after that demo, with the option that names it."""
    demo_dir = tmp_path / "configs" / "demo"
    demo_dir.mkdir(parents=True)
    (demo_dir / "alpha.yaml").write_text(
        "model:\n  class_path: x.Student\n  init_args:\n    model_name: vit_t\n"
        "    teacher:\n      checkpoint: runs/demo/zeta/last.ckpt\n")
    (demo_dir / "zeta.yaml").write_text("# demo: Zeta, a teacher\nmodel:\n  class_path: x.Zeta\n")
    monkeypatch.chdir(tmp_path)
    demos = find_demos()
    assert list(demos) == ["alpha", "zeta"]
    assert demos["alpha"].what == "Student, vit_t" and demos["zeta"].what == "Zeta, a teacher"
    assert demos["alpha"].teacher == ("zeta", "--model.init_args.teacher.checkpoint")
    assert _with_teachers(["alpha"], demos) == ["zeta", "alpha"]
    assert _with_teachers(["zeta", "alpha"], demos) == ["zeta", "alpha"]


def test_demo_table_is_pasted_between_the_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    paste_into_readme(readme, "| new | table |\n")
    assert readme.read_text() == f"# x\n\n{README_START}\n| new | table |\n{README_END}\n\nafter\n"
    paste_into_readme(readme, "| newer |\n")  # pasting again replaces, never appends
    assert readme.read_text().count("table") == 0 and "| newer |" in readme.read_text()
    (tmp_path / "plain.md").write_text("no markers\n")
    proc = run_cli("demo", "--readme", str(tmp_path / "plain.md"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "markers" in proc.stderr and not (tmp_path / "out").exists()


def test_the_readme_holds_the_demo_markers():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert text.count(README_START) == 1 and text.index(README_START) < text.index(README_END)

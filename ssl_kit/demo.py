"""``python -m ssl_kit demo``: run every CPU demo in turn and write the results table from the runs.

Each demo is its own ``python -m ssl_kit fit --config configs/demo/<method>.yaml`` process, so
its wall time is the wall time a user sees for that one command (start-up and the end-of-run
report included). The table and the JSON are built from the ``eval.json`` each run writes, never
typed: README's results table is this job's ``results.md``, pasted.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ssl_kit.callbacks.report import COLUMNS, ENCODERS, top1
from ssl_kit.errors import UserError

#: Demo name -> (config, what the demo trains). EVA's teacher is the MAE demo's encoder.
DEMOS = {
    "mae": ("configs/demo/mae.yaml", "MAE, ViT 128x6 patch 4 @ 32 px"),
    "fcmae": ("configs/demo/fcmae.yaml", "FCMAE, ConvNeXt V2-Atto @ 64 px"),
    "relicv2": ("configs/demo/relicv2.yaml", "ReLICv2, ResNet-18 @ 32/16 px"),
    "eva": ("configs/demo/eva.yaml", "EVA, ViT 128x6 student of the MAE demo"),
}
TEACHER_OF = {"eva": "mae"}


def _config_path(relative: str) -> Path:
    """``configs/...`` from the working directory, else from the repository holding this package."""
    here = Path(relative)
    return here if here.is_file() else Path(__file__).resolve().parents[1] / relative


def machine() -> str:
    """One line naming the CPU, its cores and the software versions (for the table's caption)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pytorch_lightning as pl

    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; torch {torch.__version__}, "
            f"Lightning {pl.__version__}, Python {platform.python_version()}")


def run_demo(name: str, output: Path, fit_args: list[str], teacher: Path | None) -> dict:
    """Run one demo's ``fit`` as a subprocess; returns its eval.json with the wall time added."""
    config, _ = DEMOS[name]
    log = output / f"{name}.log"
    args = [sys.executable, "-m", "ssl_kit", "fit", "--config", str(_config_path(config)),
            "--trainer.default_root_dir", str(output / name), *fit_args]
    if teacher is not None:
        args += ["--model.init_args.teacher.checkpoint", str(teacher)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"demo {name!r} failed (exit {proc.returncode}); its output is in {log}:\n{text[-3000:]}")
    run_dir = Path(re.findall(r"^run directory: (.+)$", text, re.M)[-1])
    results = json.loads((run_dir / "eval.json").read_text())
    results.update(demo=name, config=config, run_dir=str(run_dir), wall_s=round(wall, 1))
    return results


def _cell(results: dict, protocol: str) -> str:
    values = [top1(results, encoder, protocol) for encoder in ENCODERS]
    if values[0] is None:
        return "-"
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def results_table(runs: list[dict], when: str, where: str) -> str:
    """The Markdown results table of ``runs`` (as :func:`run_demo` returns them)."""
    head = "| demo | what | " + " | ".join(f"{title} top-1" for _, title in COLUMNS) + " | wall |"
    lines = [f"Measured {when} on {where}. Each cell: pretrained / random init / raw pixels, top-1 % on the",
             "held-out split (k-NN: k=20, T=0.07; linear: BatchNorm + linear on frozen features; fine-tune:",
             "the whole encoder, a few epochs). Wall: the whole `fit` command, report included.", "",
             head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in runs:
        m, s = divmod(int(round(r["wall_s"])), 60)
        cells = " | ".join(_cell(r, key) for key, _ in COLUMNS)
        lines.append(f"| `{r['config']}` | {DEMOS[r['demo']][1]} | {cells} | {m} min {s:02d} s |")
    total = sum(r["wall_s"] for r in runs)
    lines.append(f"\nAll {len(runs)} demos: {int(total // 60)} min {int(round(total % 60)):02d} s.")
    return "\n".join(lines) + "\n"


def demo(methods: list[str] | None = None, output: str = "runs/demo", fit_args: list[str] | None = None) -> list[dict]:
    """Run the CPU demos in turn and write the results table (Markdown) and JSON from the runs.

    Args:
        methods: which demos (default all: mae, fcmae, relicv2, eva). EVA's teacher is the MAE
            demo's encoder, so ``eva`` alone trains the MAE demo first.
        output: directory of the runs, the logs, ``results.md`` and ``results.json``.
        fit_args: extra ``fit`` flags for every demo (e.g. ``[--trainer.max_epochs=1]`` for a quick look).
    """
    names = list(methods or DEMOS)
    unknown = [n for n in names if n not in DEMOS]
    if unknown:
        raise UserError(f"unknown demo(s) {unknown}: choose from {list(DEMOS)}.")
    for name in list(names):  # a demo needs its teacher's run first
        if name in TEACHER_OF and TEACHER_OF[name] not in names:
            names.insert(names.index(name), TEACHER_OF[name])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: python -m ssl_kit fit --config {DEMOS[name][0]} (log: {out / name}.log)",
              flush=True)
        teacher = Path(runs[TEACHER_OF[name]]["run_dir"]) / "last.ckpt" if name in TEACHER_OF else None
        runs[name] = r = run_demo(name, out, list(fit_args or []), teacher)
        summary = ", ".join(f"{title} {_cell(r, key)}" for key, title in COLUMNS if _cell(r, key) != "-")
        print(f"[{i}/{len(names)}] {name}: {r['wall_s']:.0f} s; top-1 pretrained / random / pixels: {summary}",
              flush=True)
        page = Path(r["run_dir"]) / "report" / "report.html"  # the demo config's ShowReport
        if page.is_file():
            print(f"[{i}/{len(names)}] {name}: pictures of the encoder written to {page}", flush=True)
    table = results_table(list(runs.values()), date.today().isoformat(), machine())
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"machine": machine(), "date": date.today().isoformat(),
                                                  "runs": list(runs.values())}, indent=2) + "\n")
    print("\n" + table + f"\nwritten to {out / 'results.md'} and {out / 'results.json'}")
    return list(runs.values())

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
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import yaml

from ssl_kit.callbacks.report import COLUMNS, ENCODERS, top1
from ssl_kit.errors import UserError

DEMO_DIR = "configs/demo"
#: A value ``runs/demo/<name>/last.ckpt`` in a demo's config: that demo trains this one's teacher.
_TEACHER_RUN = re.compile(r"^runs/demo/(\w+)/last\.ckpt$")


@dataclass(frozen=True)
class Demo:
    """One CPU demo: ``configs/demo/<name>.yaml``.

    Attributes:
        config: the config path as a user types it (``configs/demo/<name>.yaml``).
        what: one line for the results table (the ``# demo:`` header line, else method and encoder).
        teacher: ``(demo, option)``: the option (``--model.init_args.teacher.checkpoint``) that takes
            the ``last.ckpt`` of another demo's run, or None.
    """

    config: str
    what: str
    teacher: tuple[str, str] | None = None


def _config_path(relative: str) -> Path:
    """``configs/...`` from the working directory, else from the repository holding this package."""
    here = Path(relative)
    return here if here.exists() else Path(__file__).resolve().parents[1] / relative


def _teacher_option(node, key: str = "") -> tuple[str, str] | None:
    """The first ``runs/demo/<name>/last.ckpt`` value under ``node``: (name, dotted option)."""
    if isinstance(node, dict):
        for k, v in node.items():
            found = _teacher_option(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(node, str) and (m := _TEACHER_RUN.match(node)):
        return m.group(1), "--" + key
    return None


def find_demos() -> dict[str, Demo]:
    """Every ``configs/demo/*.yaml`` by name (a new method's demo config is picked up by itself)."""
    demos = {}
    for path in sorted(_config_path(DEMO_DIR).glob("*.yaml")):
        text = path.read_text()
        config = yaml.safe_load(text) or {}
        header = re.search(r"^# demo: (.+)$", text, re.M)
        model = config.get("model", {}) or {}
        args = model.get("init_args", {}) or {}
        what = header.group(1).strip() if header else ", ".join(
            str(x) for x in (model.get("class_path", "?").rsplit(".", 1)[-1], args.get("model_name")) if x)
        demos[path.stem] = Demo(f"{DEMO_DIR}/{path.name}", what, _teacher_option(config))
    return demos


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


def run_demo(name: str, demo: Demo, output: Path, fit_args: list[str], teacher: Path | None) -> dict:
    """Run one demo's ``fit`` as a subprocess; returns its eval.json with the wall time added."""
    config = demo.config
    log = output / f"{name}.log"
    args = [sys.executable, "-m", "ssl_kit", "fit", "--config", str(_config_path(config)),
            "--trainer.default_root_dir", str(output / name), *fit_args]
    if teacher is not None:
        args += [demo.teacher[1], str(teacher)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"demo {name!r} failed (exit {proc.returncode}); its output is in {log}:\n{text[-3000:]}")
    run_dir = Path(re.findall(r"^run directory: (.+)$", text, re.M)[-1])
    results = json.loads((run_dir / "eval.json").read_text())
    results.update(demo=name, what=demo.what, config=config, run_dir=str(run_dir), wall_s=round(wall, 1))
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
        lines.append(f"| `{r['config']}` | {r['what']} | {cells} | {m} min {s:02d} s |")
    total = sum(r["wall_s"] for r in runs)
    lines.append(f"\nAll {len(runs)} demos: {int(total // 60)} min {int(round(total % 60)):02d} s.")
    return "\n".join(lines) + "\n"


def _with_teachers(names: list[str], demos: dict[str, Demo]) -> list[str]:
    """``names`` in run order: a demo whose teacher is another demo's run comes after that run."""
    ordered: list[str] = []

    def visit(name: str, seen: tuple[str, ...] = ()) -> None:
        if name in ordered:
            return
        if name in seen:
            raise UserError(f"demo configs {list(seen)} name each other's runs as teachers (a cycle).")
        if demos[name].teacher:
            visit(demos[name].teacher[0], (*seen, name))
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


README_START, README_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def _readme_markers(readme: Path) -> tuple[str, int, int]:
    """README's text and the positions of its two demo-results markers (checked before any run)."""
    if not readme.is_file():
        raise UserError(f"--readme {str(readme)!r} is not a file.")
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise UserError(f"--readme {str(readme)!r} has no {README_START} ... {README_END} markers to paste the "
                        "table between.")
    return text, start, end


def paste_into_readme(readme: Path, table: str) -> None:
    """Replace what lies between README's two demo-results markers with ``table``."""
    text, start, end = _readme_markers(readme)
    readme.write_text(text[:start + len(README_START)] + "\n" + table + text[end:])


def demo(methods: list[str] | None = None, output: str = "runs/demo", fit_args: list[str] | None = None,
         readme: str | None = None) -> list[dict]:
    """Run the CPU demos in turn and write the results table (Markdown) and JSON from the runs.

    Args:
        methods: which demos (default: every ``configs/demo/*.yaml``). A demo whose teacher is
            another demo's encoder (EVA's is the MAE demo's) trains that demo first.
        output: directory of the runs, the logs, ``results.md`` and ``results.json``.
        fit_args: extra ``fit`` flags for every demo (e.g. ``[--trainer.max_epochs=1]`` for a quick look).
        readme: also paste the table into this file, between its demo-results markers.
    """
    demos = find_demos()
    if readme is not None:
        _readme_markers(Path(readme))
    unknown = [n for n in methods or [] if n not in demos]
    if unknown:
        raise UserError(f"unknown demo(s) {unknown}: choose from {list(demos)}.")
    names = _with_teachers(list(methods or demos), demos)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for i, name in enumerate(names, 1):
        d = demos[name]
        print(f"[{i}/{len(names)}] {name}: python -m ssl_kit fit --config {d.config} (log: {out / name}.log)",
              flush=True)
        teacher = Path(runs[d.teacher[0]]["run_dir"]) / "last.ckpt" if d.teacher else None
        runs[name] = r = run_demo(name, d, out, list(fit_args or []), teacher)
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
    if readme is not None:
        paste_into_readme(Path(readme), table)
    print("\n" + table + f"\nwritten to {out / 'results.md'} and {out / 'results.json'}"
          + (f", and pasted into {readme}" if readme else ""))
    return list(runs.values())

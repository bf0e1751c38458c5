"""Static checks of the container and launcher files (no Docker engine runs in CI)."""

from __future__ import annotations

import re
import shlex

from conftest import REPO

DOCKER = REPO / "docker"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_pinned_base_nonroot_entrypoint_and_copies_exist():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    base = [args for op, args in steps if op == "FROM"]
    assert len(base) == 1
    image, _, tag = base[0].partition(":")
    assert image == "pytorch/pytorch", base[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-(runtime|devel)", tag), f"not pinned: {base[0]}"

    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), users
    user_index = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[user_index + 1:]), "RUN after USER runs as the user: keep root work before"
    entry = [args for op, args in steps if op == "ENTRYPOINT"]
    assert entry == ['["python", "-m", "ssl_kit"]']

    copies = [shlex.split(args) for op, args in steps if op == "COPY"]
    assert copies
    sources = [src for parts in copies for src in parts[:-1] if not src.startswith("--")]
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile COPYs {src}, missing from the repository"
    for needed in ("pyproject.toml", "ssl_kit", "configs"):
        assert needed in sources


def test_dockerignore_keeps_every_copied_path():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore  # runs/ and .git never enter the build context
    for path in ("pyproject.toml", "README.md", "ssl_kit/", "configs/", "eval/"):
        assert f"!{path}" in ignore


def test_slurm_and_torchrun_examples():
    sbatch = (DOCKER / "slurm.sbatch").read_text()
    for directive in ("--signal=SIGUSR1@90", "--requeue", "--nodes=", "--ntasks-per-node=", "--gpus-per-node="):
        assert f"#SBATCH {directive}" in sbatch
    assert re.search(r"^srun .*python -m ssl_kit fit", sbatch, re.M)
    assert "--trainer.num_nodes" in sbatch and "--ckpt_path" in sbatch
    torchrun = (DOCKER / "torchrun.sh").read_text()
    assert "torchrun" in torchrun and "-m ssl_kit fit" in torchrun and "--trainer.num_nodes" in torchrun

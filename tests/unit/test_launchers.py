"""Launchers render the commands users expect (nothing is submitted)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("container", [None, "nvcr.io/nvidia/pytorch:25.01-py3"])
def test_sbatch_multi_node_command(tmp_path, container):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.txt"
    _stub(bin_dir, "srun", f'printf "%q " "$@" > {record}')
    _stub(
        bin_dir, "scontrol", 'if [ "$1" = show ]; then printf "gpu-a01\\ngpu-a02\\ngpu-a03\\n"; fi'
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECIPE": "qwen25_math_72b_cpt",
           "SLURM_JOB_NODELIST": "gpu-a[01-03]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    if container:
        env["CONTAINER_IMAGE"] = container
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch"), "parallel.pp=4", "data.blend=[\"/d/math\"]"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    args = shlex.split(record.read_text())
    torchrun = args[args.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "3"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "gpu-a01:29500"
    assert torchrun[torchrun.index("--rdzv-id") + 1] == "4242"
    tail = torchrun[torchrun.index("-m") :]
    assert tail == ["-m", "qmath_megatron", "train", "pretrain", "--recipe", "qwen25_math_72b_cpt",
                    "parallel.pp=4", 'data.blend=["/d/math"]']  # fmt: skip
    assert "--kill-on-bad-exit=1" in args
    assert ("--container-image" in args) is bool(container)
    script = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script


def test_sbatch_refuses_without_recipe(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pretrain.sbatch")], env={**os.environ, "RECIPE": ""},
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert proc.returncode != 0 and "set RECIPE" in proc.stderr


def _nemo_run(*args: str) -> str:
    pytest.importorskip("nemo_run")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "nemo_run_pretrain.py"), *args],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "400"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return " ".join(proc.stdout.split())


def test_nemo_run_slurm_dryrun_renders_sbatch(tmp_path):
    out = _nemo_run("--recipe", "qwen25_math_7b_cpt", "--executor", "slurm", "--nodes", "2", "--account", "acct",
                    "--partition", "batch", "--container-image", "img:1", "--job-dir", str(tmp_path), "--dryrun",
                    "--", "parallel.tp=4", "optim.lr=2e-5")  # fmt: skip
    assert (
        "#SBATCH --nodes=2" in out
        and "#SBATCH --account=acct" in out
        and "#SBATCH --partition=batch" in out
    )
    assert "--nnodes 2 --nproc-per-node 8" in out
    assert (
        "-m qmath_megatron train pretrain --recipe qwen25_math_7b_cpt parallel.tp=4 optim.lr=2e-5"
        in out
    )
    assert "--container-image img:1" in out and "--requeue" in out


def test_nemo_run_local_dryrun():
    out = _nemo_run(
        "--recipe", "tiny_cpu", "--executor", "local", "--gpus-per-node", "2", "--dryrun"
    )
    assert "qmath_megatron" in out and "pretrain" in out and "tiny_cpu" in out

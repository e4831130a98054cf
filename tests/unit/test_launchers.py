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
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECIPE": "qwen25_math_72b_cpt",
        "SLURM_JOB_NODELIST": "gpu-a[01-03]",
        "SLURM_NNODES": "3",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    if container:
        env["CONTAINER_IMAGE"] = container
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "slurm" / "pretrain.sbatch"),
            "parallel.pp=4",
            'data.blend=["/d/math"]',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    args = shlex.split(record.read_text())
    torchrun = args[args.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "3"
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "8"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "gpu-a01:29500"
    assert torchrun[torchrun.index("--rdzv-id") + 1] == "4242"
    tail = torchrun[torchrun.index("-m") :]
    assert tail == [
        "-m",
        "qmath_megatron",
        "train",
        "pretrain",
        "--recipe",
        "qwen25_math_72b_cpt",
        "parallel.pp=4",
        'data.blend=["/d/math"]',
    ]
    assert "--kill-on-bad-exit=1" in args
    assert ("--container-image" in args) is bool(container)
    script = (ROOT / "slurm" / "pretrain.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script


def test_sbatch_refuses_without_recipe(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "pretrain.sbatch")],
        env={**os.environ, "RECIPE": ""},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "set RECIPE" in proc.stderr


def _nemo_run(*args: str) -> str:
    pytest.importorskip("nemo_run")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "nemo_run_pretrain.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return " ".join(proc.stdout.split())


def test_nemo_run_slurm_dryrun_renders_sbatch(tmp_path):
    out = _nemo_run(
        "--recipe",
        "qwen25_math_7b_cpt",
        "--executor",
        "slurm",
        "--nodes",
        "2",
        "--account",
        "acct",
        "--partition",
        "batch",
        "--container-image",
        "img:1",
        "--job-dir",
        str(tmp_path),
        "--dryrun",
        "--",
        "parallel.tp=4",
        "optim.lr=2e-5",
    )
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


def test_grpo_sbatch_engines_on_their_own_nodes(tmp_path):
    """slurm/grpo.sbatch: the engine nodes' task starts GPUS / ENGINE_TP `qmath engine serve`
    processes (each on its GPUs, all writing to HANDLE_DIR); the trainer's torchrun runs on
    the other nodes with rl.engine_handles=HANDLE_DIR before the user's overrides."""
    script = ROOT / "slurm" / "grpo.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record, served = tmp_path / "srun.txt", tmp_path / "python.txt"
    # srun: record the step, then run the engine nodes' bash task here (python is a stub);
    # the trainer's step ends once both engines were served (the script then stops them).
    # One write per step (O_APPEND): the two steps run in the background at the same time.
    _stub(
        bin_dir,
        "srun",
        f'line=$(printf "%q " "$@"); printf "%s\\n" "$line" >> {record}\n'
        f'if [[ " $* " == *" torchrun "* ]]; then for i in $(seq 100); do\n'
        f"  [[ $(cat {served} 2>/dev/null | wc -l) -ge 2 ]] && break; sleep 0.1; done; fi\n"
        'while [[ $# -gt 0 && "$1" != bash ]]; do shift; done\n[[ $# -gt 0 ]] && exec "$@"\nexit 0',
    )
    _stub(bin_dir, "python", f'echo "$CUDA_VISIBLE_DEVICES $*" >> {served}')
    _stub(bin_dir, "scontrol", 'if [ "$1" = show ]; then printf "g01\\ng02\\ng03\\n"; fi')
    handles = tmp_path / "shared" / "engines"
    handles.mkdir(parents=True)
    (handles / "engine-10.0.0.9-1234.json").write_text("{}")  # stale, from an earlier attempt
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECIPE": "qwen25_math_72b_grpo",
        "ENGINE_MODEL": "/ckpt/hf",
        "ENGINE_NODES": "1",
        "ENGINE_TP": "4",
        "HANDLE_DIR": str(handles),
        "ENGINE_ARGS": "--max-model-len 8192",
        "SLURM_JOB_NODELIST": "g[01-03]",
        "SLURM_JOB_ID": "77",
        "SLURM_GPUS_ON_NODE": "8",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = subprocess.run(
        ["bash", str(script), "data.prompts=/d/rl.jsonl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 engines (TP 4) on g01" in proc.stdout and list(handles.iterdir()) == []
    steps = [shlex.split(line) for line in record.read_text().splitlines()]  # both in background
    (trainer_step,) = [s for s in steps if "torchrun" in s]
    (engines_step,) = [s for s in steps if "torchrun" not in s]
    assert engines_step[engines_step.index("--nodelist") + 1] == "g01"
    assert trainer_step[trainer_step.index("--nodelist") + 1] == "g02,g03"
    serve = sorted(served.read_text().splitlines())
    assert serve == [
        f"{gpus} -m qmath_megatron engine serve --model /ckpt/hf --handle-dir {handles} "
        "--tensor-parallel-size 4 --max-model-len 8192"
        for gpus in ("0,1,2,3", "4,5,6,7")
    ]
    torchrun = trainer_step[trainer_step.index("torchrun") :]
    assert torchrun[torchrun.index("--nnodes") + 1] == "2"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "g02:29500"
    assert torchrun[torchrun.index("-m") :] == [
        "-m",
        "qmath_megatron",
        "train",
        "grpo",
        "--recipe",
        "qwen25_math_72b_grpo",
        f"rl.engine_handles={handles}",
        "data.prompts=/d/rl.jsonl",
    ]
    bad = subprocess.run(
        ["bash", str(script)],
        env={**env, "ENGINE_NODES": "3"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "no node left for the trainer" in bad.stderr
    bad = subprocess.run(
        ["bash", str(script)],
        env={**env, "ENGINE_MODEL": ""},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert bad.returncode != 0 and "set ENGINE_MODEL" in bad.stderr

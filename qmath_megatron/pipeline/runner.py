"""Run one stage: the one procedure every executor uses (the local executor in its own
process, a Slurm job through ``qmath pipeline run-stage``).

The stage's command runs as a child process (``python -m qmath_megatron ...``; torchrun
for multi-process training stages; ``srun`` + torchrun across the nodes of a Slurm
allocation), its output appended to ``RUN/<stage>/log.txt`` and echoed. SIGTERM, SIGINT
and SIGUSR1 are forwarded to the child as SIGTERM: trainers save a checkpoint and exit,
data tools stop between shards; the stage is then left not done (a rerun, or Slurm's
requeue, resumes it). Only a clean exit that was not interrupted writes the done marker,
last.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmath_megatron.data.shards import die_with_parent
from qmath_megatron.pipeline.stage import Pipeline, Stage, shell_line
from qmath_megatron.pipeline.state import (
    LOCK,
    MARKER,
    RunState,
    now,
    outputs_fingerprint,
    stage_fingerprint,
    stage_lock,
    write_marker,
)

LOG = "log.txt"
INTERRUPTED = 143  # exit status of a stage stopped by a signal (128 + SIGTERM)
# Headline metrics of training stages, in the order shown; best = min for losses.
TRAIN_KEYS = (
    "loss",
    "val_loss",
    "pairwise_accuracy",
    "val_pairwise_accuracy",
    "reward",
    "accuracy",
)


@dataclass
class StageResult:
    name: str
    state: str  # done | failed | interrupted
    seconds: float
    returncode: int
    error: str | None = None


def launch_words(stage: Stage, env: dict[str, str]) -> list[str]:
    """The launcher before ``-m qmath_megatron``: python; torchrun for several processes per
    node; srun + torchrun (c10d rendezvous on the first node) across several nodes."""
    py = [sys.executable]
    if stage.kind != "train" or (
        stage.resources.nodes == 1 and stage.resources.tasks_per_node == 1
    ):
        return py
    torchrun = [
        *py,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(stage.resources.tasks_per_node),
    ]
    if stage.resources.nodes == 1:
        return torchrun
    head = env.get("QMATH_HEAD_NODE") or env.get("SLURMD_NODENAME", "localhost")
    return [
        "srun",
        "--kill-on-bad-exit=1",
        "--ntasks-per-node=1",
        *torchrun,
        "--nnodes",
        str(stage.resources.nodes),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{head}:{env.get('MASTER_PORT', '29500')}",
        "--rdzv-id",
        env.get("SLURM_JOB_ID", "qmath"),
    ]


def stage_command(
    pipeline: Pipeline, run: Path, name: str, env: dict[str, str] | None = None
) -> list[str]:
    """The full command line of a stage."""
    stage = pipeline.stages[name]
    return [
        *launch_words(stage, dict(env or os.environ)),
        "-m",
        "qmath_megatron",
        *pipeline.argv(run, name),
    ]


def clear_stage_dir(run: Path, name: str) -> None:
    """Remove what an earlier, unfinished attempt of a non-resumable stage left (the log
    stays): its command would otherwise refuse to overwrite its own partial outputs."""
    import shutil

    d = run / name
    for p in d.iterdir() if d.is_dir() else ():
        if p.name in (LOG, MARKER, LOCK):  # the lock: held right now by this attempt
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def run_stage(
    pipeline: Pipeline,
    run: Path,
    name: str,
    *,
    echo: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> StageResult:
    """Run stage ``name`` of ``pipeline`` in ``run`` to completion (or failure)."""
    echo = echo or (lambda line: print(line, end="", flush=True))
    with stage_lock(run, name, log=lambda m: echo(m + "\n")) as lock_fd:
        return _run_locked(pipeline, run, name, echo, env, lock_fd)


def _run_locked(
    pipeline: Pipeline,
    run: Path,
    name: str,
    echo: Callable[[str], None],
    env: dict[str, str] | None,
    lock_fd: int,
) -> StageResult:
    stage = pipeline.stages[name]
    state = RunState(run)
    stage_dir = run / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = stage_fingerprint(pipeline, run, name)
    if not stage.resumable:
        clear_stage_dir(run, name)
    env = dict(env or os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = stage_command(pipeline, run, name, env)
    log_path = stage_dir / LOG
    start = time.time()
    state.set_stage(
        name,
        state="running",
        started=now(),
        log=str(log_path),
        pid=os.getpid(),
        host=os.uname().nodename,
        command=shell_line(cmd),
        error=None,
        job_id=env.get("SLURM_JOB_ID"),
    )
    interrupted: list[int] = []
    parent = os.getpid()
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"\n=== qmath pipeline: stage {name} ({stamp})\n$ {shell_line(cmd)}\n"
        log.write(header)
        log.flush()
        echo(header.lstrip("\n"))
        child = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,  # our signal handlers decide what the child gets
            pass_fds=(lock_fd,),  # the stage stays locked while the child lives
            # Killed without a chance to forward (kill -9): the child gets SIGTERM, so a
            # trainer still saves and nothing runs on unattended.
            preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),
        )

        def forward(signum: int, _frame: Any) -> None:
            interrupted.append(signum)
            if child.poll() is None:
                # the whole group: torchrun and its ranks, or a data tool and its workers
                os.killpg(child.pid, signal.SIGTERM)

        previous = {
            s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        }
        try:
            assert child.stdout is not None
            for line in child.stdout:
                log.write(line)
                log.flush()
                echo(line)
            rc = child.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    seconds = round(time.time() - start, 2)
    if interrupted:
        reason = f"interrupted by {signal.Signals(interrupted[0]).name}; rerun to resume"
        state.set_stage(name, state="pending", seconds=seconds, ended=now(), error=reason)
        return StageResult(name, "interrupted", seconds, INTERRUPTED, reason)
    if rc != 0:
        error = last_error_line(log_path) or f"exit status {rc}"
        state.set_stage(
            name, state="failed", seconds=seconds, ended=now(), error=error, returncode=rc
        )
        return StageResult(name, "failed", seconds, rc, error)
    try:
        outputs = pipeline.outputs(run, name)
        record = {
            "stage": name,
            "fingerprint": fingerprint,
            "outputs": {k: str(v) for k, v in outputs.items()},
            "outputs_fingerprint": outputs_fingerprint(outputs),
            "seconds": seconds,
            "metrics": headline_metrics(stage, run),
            "finished": now(),
        }
    except (FileNotFoundError, ValueError) as exc:
        error = f"the command succeeded but {exc}"
        state.set_stage(
            name, state="failed", seconds=seconds, ended=now(), error=error, returncode=rc
        )
        return StageResult(name, "failed", seconds, 1, error)
    write_marker(run, name, record)  # last: the stage is done
    state.set_stage(name, state="done", seconds=seconds, ended=now(), error=None, returncode=0)
    return StageResult(name, "done", seconds, 0)


def last_error_line(log_path: Path) -> str | None:
    """The last ``qmath: error`` / exception line of the log, else its last non-empty line."""
    try:
        lines = [x.strip() for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    lines = (
        lines[lines.index(next(x for x in reversed(lines) if x.startswith("$ "))) + 1 :]
        if any(x.startswith("$ ") for x in lines)
        else lines
    )
    for line in reversed(lines):
        if "error" in line.lower() or line.split(":", 1)[0].endswith(("Error", "Exception")):
            return line[:500]
    return lines[-1][:500] if lines else None


# --------------------------------------------------------------------------- metrics


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: the rest still counts
    return rows


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``[(iteration, value)]`` of ``key`` (finite values only)."""
    out = []
    for r in rows:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v) and "iteration" in r:
            out.append((int(r["iteration"]), float(v)))
    return out


def summarize_series(key: str, points: list[tuple[int, float]]) -> dict:
    lower = "loss" in key
    best = min(points, key=lambda p: p[1]) if lower else max(points, key=lambda p: p[1])
    return {
        "first": round(points[0][1], 6),
        "last": round(points[-1][1], 6),
        "best": round(best[1], 6),
        "best_iteration": best[0],
        "iterations": points[-1][0],
    }


def headline_metrics(stage: Stage, run: Path) -> dict:
    """Training: first / last / best of each headline key; eval: every benchmark/mode's
    metrics; data: the numbers at the top level of the report."""
    if stage.metrics is None:
        return {}
    path = run / stage.name / stage.metrics
    if stage.kind == "train":
        rows = read_jsonl(path)
        return {k: summarize_series(k, s) for k in TRAIN_KEYS if (s := series(rows, k))}
    if stage.kind == "eval":
        out = {}
        for m in sorted(path.glob("*/*/metrics.json")):
            out[f"{m.parent.parent.name}/{m.parent.name}"] = json.loads(m.read_text())
        return out
    if path.is_file():
        report = json.loads(path.read_text())
        return {
            k: v
            for k, v in report.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return {}

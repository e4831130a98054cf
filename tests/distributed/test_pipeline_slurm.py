"""``qmath pipeline run --executor slurm`` against a real one-node Slurm cluster (Debian's
packages, started by the test; skipped with one line where it cannot be): the pipeline
completes with the same outputs as the local executor, a failed stage's dependents never
run (``afterok``), and a preempted training stage saves, requeues and resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmath_megatron.pipeline.cli import _record_run
from qmath_megatron.pipeline.executors import ExecutorConfig, SlurmExecutor, slurm_job_state
from qmath_megatron.pipeline.plan import make_plan
from qmath_megatron.pipeline.report import collect_status
from qmath_megatron.pipeline.stage import Pipeline, Resources, Stage
from qmath_megatron.pipeline.state import read_marker
from tests.slurm_cluster import start_cluster, stop_cluster
from tests.unit.test_pipeline import run_local, small_pipeline

pytestmark = pytest.mark.distributed
ONE_CPU = ExecutorConfig(cpus_per_task=1, wait=True, poll_s=1.0)


@pytest.fixture(scope="module")
def slurm():
    why = start_cluster()
    if why:
        pytest.skip(f"no Slurm cluster: {why}")
    yield
    stop_cluster()


def run_slurm(pipeline: Pipeline, run: Path, cfg: ExecutorConfig = ONE_CPU) -> int:
    plan = make_plan(pipeline, run, {})
    _record_run(pipeline, run, {}, "slurm")
    return SlurmExecutor(cfg, log=print).run(plan)


def with_reader(p: Pipeline) -> Pipeline:
    """``small_pipeline`` plus a stage that reads dedup's output."""
    stages = list(p.stages.values()) + [
        Stage(
            "again",
            "data",
            ("data", "dedup"),
            {"input": "{dedup.out}/kept/*", "output": "{self.out}", "text_key": "problem"},
            outputs={"out": "out"},
        )
    ]
    return Pipeline(p.recipe, stages)


def test_slurm_pipeline_equals_local_and_afterok_stops_dependents(slurm, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    assert run_local(with_reader(small_pipeline()), local) == 0
    assert run_slurm(with_reader(small_pipeline()), remote) == 0
    for rel in ("problems/problems.jsonl", "dedup/out/kept/problems.jsonl", "extra/sft.jsonl"):
        assert (remote / rel).read_bytes() == (local / rel).read_bytes(), rel
    status = collect_status(remote)
    assert {s["state"] for s in status["stages"]} == {"done"}
    assert all(s["job_id"] for s in status["stages"])
    # A second submission submits nothing: every stage is done.
    assert make_plan(with_reader(small_pipeline()), remote, {}).todo == []

    # A stage that fails: its dependent is cancelled by Slurm (afterok), never run.
    bad = with_reader(small_pipeline())
    bad.apply_overrides({"dedup.threshold": 7.5})
    failed = tmp_path / "failed"
    assert run_slurm(bad, failed) == 1
    states = {s["name"]: s for s in collect_status(failed)["stages"]}
    assert states["problems"]["state"] == "done" and states["extra"]["state"] == "done"
    assert states["dedup"]["state"] == "failed" and "threshold" in states["dedup"]["error"]
    assert states["again"]["state"] == "pending" and "never ran" in states["again"]["error"]
    assert not (failed / "again" / "log.txt").exists()


def test_preempted_training_stage_saves_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    iters = 16
    train = Stage(
        "pretrain",
        "train",
        ("train", "pretrain"),
        {
            "recipe": "tiny_cpu",
            "train.train_iters": iters,
            "data.synthetic_documents": 200,
            "checkpoint.save_interval": 100,  # only the preemption save and the last
            "checkpoint.save": "{self.ckpt}",
        },
        outputs={"ckpt": "ckpt"},
        resources=Resources(cpus_per_task=1, time="00:20:00"),
        resumable=True,
        metrics="ckpt/metrics.jsonl",
    )
    pipeline = Pipeline("test", [train])
    cfg = ExecutorConfig(cpus_per_task=1, wait=False)
    assert run_slurm(pipeline, run, cfg) == 0
    job = json.loads((run / "pipeline.json").read_text())["stages"]["pretrain"]["job_id"]
    metrics = run / "pretrain" / "ckpt" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.is_file() and len(metrics.read_text().splitlines()) >= 3
    ):
        time.sleep(0.5)
    assert metrics.is_file(), (run / "pretrain" / "log.txt").read_text()[-2000:]
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.time() + 600
    pending_since = None
    released = False
    while time.time() < deadline and read_marker(run, "pretrain") is None:
        if slurm_job_state(job) in (None, "FAILED"):
            break
        if slurm_job_state(job) == "PENDING" and pending_since is None:
            pending_since = time.time()
        if not released and pending_since and time.time() - pending_since > 5:
            # Slurm holds a requeued batch job back for a while before it may start again;
            # let it start now (test time only: the requeue itself is the scheduler's). Not
            # at once: a start before slurmd has finished the killed run is refused.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
            released = True
        time.sleep(1)
    assert read_marker(run, "pretrain") is not None, (run / "pretrain" / "log.txt").read_text()[
        -3000:
    ]
    log = (run / "pretrain" / "log.txt").read_text()
    assert log.count("=== qmath pipeline: stage pretrain") == 2  # the job ran twice
    saved = (run / "pretrain/ckpt/latest_checkpointed_iteration.txt").read_text().strip()
    assert saved == str(iters)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r["iteration"] for r in rows if "loss" in r]
    assert steps == list(range(1, iters + 1))  # resumed from the save, not restarted
    assert "requeueing job" in (run / "pretrain" / f"slurm-{job}.out").read_text()


def test_dry_run_prints_the_scripts_without_submitting(slurm, tmp_path):
    out = subprocess.run(
        [
            *(sys.executable, "-m", "qmath_megatron", "pipeline", "run", "--recipe", "tiny_cpu"),
            *("--workdir", str(tmp_path / "r"), "--executor", "slurm", "--dry-run"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr.count("#!/bin/bash") == 33
    assert not (tmp_path / "r").exists()

"""Where a pipeline's stages run: ``local``, ``slurm`` and ``nemo-run`` executors.

Every executor runs each stage through :func:`qmath_megatron.pipeline.runner.run_stage`
(in this process for ``local``; as ``qmath pipeline run-stage`` inside a job otherwise),
so done markers, logs and state are the same whatever ran them. New executors register
with :func:`register_executor`.

- ``local``: the pending stages one after another in this process tree; a failed stage
  stops the run (its downstream stages never start).
- ``slurm``: one sbatch job per pending stage with the stage's resources, chained with
  ``--dependency=afterok:<upstream jobs>`` and ``--kill-on-invalid-dep=yes`` (a failed
  stage's dependents are cancelled, never run); training stages are requeued on preemption
  (``--requeue --signal=B:USR1@GRACE``: the runner forwards the signal to the trainer,
  which saves, and the job requeues itself and resumes from that checkpoint). Done stages
  are not submitted. ``--dry-run`` prints the scripts; ``--wait`` blocks until the jobs end.
- ``nemo-run``: the same DAG as a nemo-run Experiment (``run.Script`` per stage with its
  dependencies; ``run.LocalExecutor`` or ``run.SlurmExecutor``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmath_megatron.pipeline.plan import Plan
from qmath_megatron.pipeline.runner import INTERRUPTED, run_stage, stage_command
from qmath_megatron.pipeline.stage import Stage, shell_line
from qmath_megatron.pipeline.state import RunState, read_marker

PREVIOUS = ".previous"


@dataclass
class ExecutorConfig:
    """Scheduler settings (resources per stage come from the recipe)."""

    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_signal_grace_s: int = 300  # USR1 this long before a training job's time limit
    slurm_extra: list[str] | None = None  # more #SBATCH lines, e.g. ["--exclusive"]
    wait: bool = False  # slurm / nemo-run: block until the jobs end
    poll_s: float = 5.0
    cpus_per_task: int | None = None  # cap every stage's CPUs (a small test cluster)
    nemo_run_home: str | None = None  # nemo-run's experiments (default: RUN/.nemo_run)


class Executor(ABC):
    name = ""

    def __init__(self, cfg: ExecutorConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log

    @abstractmethod
    def run(self, plan: Plan, dry_run: bool = False) -> int:
        """Run (or submit) ``plan.todo``; 0 when every stage is done (or submitted)."""


_EXECUTORS: dict[str, type[Executor]] = {}


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    def add(cls: type[Executor]) -> type[Executor]:
        if name in _EXECUTORS:
            raise ValueError(f"executor {name!r} registered twice")
        cls.name = name
        _EXECUTORS[name] = cls
        return cls

    return add


def executor_names() -> list[str]:
    return list(_EXECUTORS)


def build_executor(name: str, cfg: ExecutorConfig, log: Callable[[str], None]) -> Executor:
    if name not in _EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(_EXECUTORS)}, got {name!r}")
    return _EXECUTORS[name](cfg, log)


def set_aside(run: Path, name: str) -> None:
    """``--from``: move a done stage's directory to ``RUN/.previous/<name>`` (replacing an
    older one there), so it reruns from nothing and its last outputs are not destroyed."""
    src = run / name
    if not src.exists():
        return
    dest = run / PREVIOUS / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(src, dest)


def prepare_reruns(plan: Plan) -> None:
    for name in plan.todo:
        if name in plan.rerun and read_marker(plan.run, name) is not None:
            set_aside(plan.run, name)
            RunState(plan.run).set_stage(name, state="pending", error=None, seconds=None)


@register_executor("local")
class LocalExecutor(Executor):
    def run(self, plan: Plan, dry_run: bool = False) -> int:
        if dry_run:
            for name in plan.todo:
                self.log(f"# {name}\n{shell_line(stage_command(plan.pipeline, plan.run, name))}")
            return 0
        prepare_reruns(plan)
        for i, name in enumerate(plan.todo, 1):
            self.log(f"qmath pipeline: stage {i}/{len(plan.todo)}: {name}")
            result = run_stage(plan.pipeline, plan.run, name)
            if result.state == "interrupted":
                self.log(f"qmath pipeline: {name} {result.error}")
                return INTERRUPTED
            if result.state == "failed":
                left = plan.todo[i:]
                self.log(
                    f"qmath: error: stage {name} failed after {result.seconds:.1f}s: "
                    f"{result.error}\n"
                    f"  log: {plan.run / name / 'log.txt'}\n"
                    + (f"  not started: {', '.join(left)}" if left else "")
                )
                return 1
            self.log(f"qmath pipeline: {name} done in {result.seconds:.1f}s")
        return 0


# --------------------------------------------------------------------------- Slurm


def run_stage_command(run: Path, name: str) -> list[str]:
    """What a scheduler's job runs: one stage of the recorded run."""
    return [
        *(sys.executable, "-m", "qmath_megatron", "pipeline", "run-stage"),
        *("--workdir", str(run), "--stage", name),
    ]


def sbatch_script(plan: Plan, stage: Stage, cfg: ExecutorConfig) -> str:
    """The batch script of one stage: resources only; the stage's settings stay in the
    pipeline's state, read by ``qmath pipeline run-stage``."""
    r = stage.resources
    run = plan.run.resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=qmath-{run.name}-{stage.name}",
        f"#SBATCH --nodes={r.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={min(r.cpus_per_task, cfg.cpus_per_task or r.cpus_per_task)}",
        f"#SBATCH --time={r.time}",
        f"#SBATCH --output={run / stage.name / 'slurm-%j.out'}",
        "#SBATCH --open-mode=append",
    ]
    if r.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={r.gpus_per_node}")
    if r.mem:
        lines.append(f"#SBATCH --mem={r.mem}")
    if stage.kind == "train":
        lines += ["#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{cfg.slurm_signal_grace_s}"]
    for flag, value in (
        ("partition", cfg.slurm_partition),
        ("account", cfg.slurm_account),
        ("qos", cfg.slurm_qos),
    ):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {extra}" for extra in cfg.slurm_extra or ()]
    lines += [
        "set -euo pipefail",
        f"cd {shell_line([os.getcwd()])}",
        "export PYTHONUNBUFFERED=1",
        'export QMATH_HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        # exec: the runner is the batch shell, so B:USR1 reaches it (it forwards SIGTERM to
        # the stage's command and requeues the job once the trainer has saved).
        "exec " + shell_line(run_stage_command(run, stage.name)),
        "",
    ]
    return "\n".join(lines)


def _sbatch(script: Path, deps: list[str]) -> str:
    cmd = ["sbatch", "--parsable"]
    if deps:
        cmd += [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
    out = subprocess.run([*cmd, str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def slurm_job_state(job_id: str) -> str | None:
    """The job's state from ``scontrol`` (accounting may be off); None once it is gone."""
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    for word in out.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


_ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "DEADLINE",
    "BOOT_FAIL",
}


@register_executor("slurm")
class SlurmExecutor(Executor):
    def run(self, plan: Plan, dry_run: bool = False) -> int:
        scripts = {
            name: sbatch_script(plan, plan.pipeline.stages[name], self.cfg) for name in plan.todo
        }
        if dry_run:
            for name, text in scripts.items():
                ups = [u for u in plan.pipeline.stages[name].upstream() if u in plan.todo]
                dep = f" (sbatch --dependency=afterok on {', '.join(ups)})" if ups else ""
                self.log(f"# ---- {plan.run / name / 'job.sbatch'}{dep}\n{text}")
            return 0
        if shutil.which("sbatch") is None:
            raise FileNotFoundError("--executor slurm: sbatch not found on PATH")
        prepare_reruns(plan)
        state = RunState(plan.run)
        ids: dict[str, str] = {}
        for name in plan.todo:
            path = plan.run / name / "job.sbatch"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(scripts[name])
            deps = [ids[u] for u in plan.pipeline.stages[name].upstream() if u in ids]
            ids[name] = _sbatch(path, deps)
            state.set_stage(name, state="pending", job_id=ids[name], error=None, executor="slurm")
            self.log(
                f"qmath pipeline: {name}: submitted job {ids[name]}"
                + (f" (after {', '.join(deps)})" if deps else "")
            )
        if not ids:
            return 0
        self.log(
            f"follow with: squeue -j {','.join(ids.values())}; qmath pipeline status {plan.run}"
        )
        if not self.cfg.wait:
            return 0
        return wait_for_jobs(plan, ids, self.cfg.poll_s, self.log)


def wait_for_jobs(
    plan: Plan, ids: dict[str, str], poll_s: float, log: Callable[[str], None]
) -> int:
    """Block until every job has ended; 0 when every stage is done."""
    pending = dict(ids)
    while pending:
        for name, job in list(pending.items()):
            st = slurm_job_state(job)
            if st is None or st in _ENDED:
                pending.pop(name)
                done = read_marker(plan.run, name) is not None
                log(f"qmath pipeline: {name} (job {job}): {'done' if done else st or 'gone'}")
                if not done:
                    _record_unfinished(plan, name, st)
        if pending:
            time.sleep(poll_s)
    failed = [n for n in ids if read_marker(plan.run, n) is None]
    if failed:
        log(
            f"qmath: error: stages not done: {', '.join(failed)} (qmath pipeline status {plan.run})"
        )
        return 1
    return 0


def _record_unfinished(plan: Plan, name: str, slurm_state: str | None) -> None:
    state = RunState(plan.run)
    rec = state.read().get("stages", {}).get(name, {})
    if rec.get("state") in ("failed",):
        return
    if rec.get("state") in (None, "pending") and slurm_state == "CANCELLED":
        state.set_stage(
            name, state="pending", error="never ran: an upstream stage failed (job cancelled)"
        )
    elif rec.get("state") != "done":
        state.set_stage(name, state="failed", error=rec.get("error") or f"job ended {slurm_state}")


# --------------------------------------------------------------------------- nemo-run


@register_executor("nemo-run")
class NemoRunExecutor(Executor):
    """One ``run.Script`` per stage (``qmath pipeline run-stage``) in a nemo-run
    Experiment, with the DAG's dependencies: ``run.SlurmExecutor`` (afterok, submitted at
    once) when a partition or account is set, else ``run.LocalExecutor`` (nemo-run then
    runs the jobs one after another in dependency order)."""

    def run(self, plan: Plan, dry_run: bool = False) -> int:
        import nemo_run as run

        run.config.set_nemorun_home(self.cfg.nemo_run_home or str(plan.run / ".nemo_run"))
        if not dry_run:
            prepare_reruns(plan)
        slurm = bool(self.cfg.slurm_partition or self.cfg.slurm_account)
        with run.Experiment(f"qmath-{plan.run.resolve().name}", log_level="WARN") as exp:
            ids: dict[str, str] = {}
            for name in plan.todo:
                stage = plan.pipeline.stages[name]
                script = run.Script(inline=shell_line(run_stage_command(plan.run.resolve(), name)))
                executor = self._executor(run, stage, slurm)
                deps = [ids[u] for u in stage.upstream() if u in ids]
                ids[name] = exp.add(script, executor=executor, name=name, dependencies=deps or None)
            if dry_run:
                exp.dryrun()
                return 0
            exp.run(detach=slurm and not self.cfg.wait, tail_logs=False)
        missing = [n for n in plan.todo if read_marker(plan.run, n) is None]
        if missing and (not slurm or self.cfg.wait):
            self.log(
                f"qmath: error: stages not done: {', '.join(missing)} "
                f"(qmath pipeline status {plan.run})"
            )
            return 1
        return 0

    def _executor(self, run, stage: Stage, slurm: bool):
        r = stage.resources
        if not slurm:
            return run.LocalExecutor()
        return run.SlurmExecutor(
            account=self.cfg.slurm_account or "",
            partition=self.cfg.slurm_partition,
            nodes=r.nodes,
            ntasks_per_node=1,
            cpus_per_task=min(r.cpus_per_task, self.cfg.cpus_per_task or r.cpus_per_task),
            gpus_per_node=r.gpus_per_node or None,
            time=r.time,
            mem=r.mem,
            signal=f"B:USR1@{self.cfg.slurm_signal_grace_s}" if stage.kind == "train" else None,
            # The tunnel's job_dir is where the experiment's files are: nemo-run copies
            # them there only through SSH tunnels; a local one reads them in place.
            tunnel=run.LocalTunnel(
                job_dir=str(Path(run.config.get_nemorun_home()) / "experiments")
            ),
            packager=run.Packager(),  # the code is on this file system already
        )

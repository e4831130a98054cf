"""``qmath pipeline run | status | report | run-stage``: the recipe's loop as one command.

qmath pipeline run --recipe NAME --workdir RUN [--executor local|slurm|nemo-run]
    [--stages a,b,...] [--from STAGE] [--dry-run] [STAGE.KEY=VALUE ...]
qmath pipeline status RUN [--json]
qmath pipeline report RUN
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later, takes_value
from qmath_megatron.config.overrides import parse_override
from qmath_megatron.pipeline.executors import ExecutorConfig, build_executor, executor_names
from qmath_megatron.pipeline.plan import make_plan
from qmath_megatron.pipeline.recipes import RECIPES, get_pipeline
from qmath_megatron.pipeline.report import collect_status, eval_table, status_table, write_report
from qmath_megatron.pipeline.runner import INTERRUPTED, run_stage
from qmath_megatron.pipeline.stage import _PLACEHOLDER, Pipeline, Stage
from qmath_megatron.pipeline.state import RunState, now

_OVERRIDE_WORD = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_]\w*)*=")


@dataclass
class PipelineRunConfig:
    recipe: str
    workdir: str
    executor: str = "local"
    stages: list[str] | None = None  # only these (comma-separated on the command line)
    from_stage: str | None = None  # rerun this stage and everything downstream of it
    dry_run: bool = False
    # STAGE.KEY=VALUE settings of the stages (also the `stages_settings` mapping of a YAML
    # file: {stage: {key: value}}).
    stage_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheduler: ExecutorConfig = field(default_factory=ExecutorConfig)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.executor not in executor_names():
            raise ValueError(
                f"--executor must be one of {', '.join(executor_names())}, got {self.executor!r}"
            )


@dataclass
class PipelineStatusConfig:
    run: str
    json: bool = False


@dataclass
class PipelineReportConfig:
    run: str


@dataclass
class RunStageConfig:
    workdir: str
    stage: str


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_pipeline(recipe: str, overrides: dict[str, Any]) -> Pipeline:
    pipeline = get_pipeline(recipe)
    pipeline.apply_overrides(overrides)
    return pipeline


def _split_stage_overrides(args: argparse.Namespace, stage_names: list[str]) -> dict[str, Any]:
    """Trailing ``STAGE.KEY=VALUE`` words (typed like YAML values); the others are the
    command's own settings (``scheduler.wait=true``) and stay in ``args.overrides``."""
    own, stage = [], {}
    for word in args.overrides:
        key = word.split("=", 1)[0]
        if key.split(".", 1)[0] in (*stage_names, "inputs") and "." in key:
            path, value = parse_override(word)
            raw = word.split("=", 1)[1]
            # A path placeholder ({stage.output}) is a string, not a YAML mapping.
            stage[path] = raw if isinstance(value, dict) and _PLACEHOLDER.search(raw) else value
        else:
            own.append(word)
    args.overrides = own
    return stage


def run_pipeline(cfg: PipelineRunConfig, overrides: dict[str, Any]) -> int:
    run = Path(cfg.workdir).resolve()
    for stage, settings in cfg.stage_settings.items():
        for key, value in settings.items():
            overrides.setdefault(f"{stage}.{key}", value)
    pipeline = build_pipeline(cfg.recipe, overrides)
    unset = " ".join(f"{k}=PATH" for k in pipeline.unset_inputs())
    if unset and not cfg.dry_run:
        raise ValueError(f"recipe {cfg.recipe} needs its inputs: set {unset}")
    if unset:
        _log(f"qmath pipeline: inputs not set yet (shown as ???): {unset}")
    plan = make_plan(pipeline, run, overrides, cfg.stages, cfg.from_stage)
    if not cfg.dry_run:
        _record_run(pipeline, run, overrides, cfg.executor)
    executor = build_executor(cfg.executor, cfg.scheduler, _log)
    if not plan.todo:
        _log(f"qmath pipeline: every stage of {run} is done ({len(plan.done)} stages)")
    else:
        done = f" ({len(plan.done)} done, skipped)" if plan.done else ""
        _log(
            f"qmath pipeline: {cfg.recipe} in {run}: {len(plan.todo)} stages to run{done}: "
            + ", ".join(plan.todo)
        )
    rc = executor.run(plan, dry_run=cfg.dry_run) if plan.todo else 0
    if not cfg.dry_run and rc == 0 and cfg.executor == "local":
        status = collect_status(run)
        print(status_table(status))
        print()
        print(eval_table(status))
    return rc


def _record_run(pipeline: Pipeline, run: Path, overrides: dict[str, Any], executor: str) -> None:
    """``pipeline.json``: the DAG, recipe and overrides (stage records are kept)."""
    state = RunState(run)
    with state.update() as data:
        data["version"] = 1
        data["recipe"] = pipeline.recipe
        data["overrides"] = {**data.get("overrides", {}), **overrides}
        data["executor"] = executor
        data["updated"] = now()
        data["inputs"] = pipeline.inputs
        data["dag"] = [
            {
                **s.to_dict(),
                "argv": pipeline.argv(run, s.name),
                "upstream": s.upstream(),
                "paths": {k: str(v) for k, v in pipeline.outputs(run, s.name).items()},
            }
            for s in pipeline.stages.values()
        ]
        records = data.setdefault("stages", {})
        for s in pipeline.stages.values():
            records.setdefault(s.name, {"state": "pending"})


# --------------------------------------------------------------------------- commands


def run_run(args: argparse.Namespace) -> int:
    from qmath_megatron.pipeline.recipes import get_pipeline as _get

    recipe = args.recipe or ""
    names = list(_get(recipe).stages) if recipe in RECIPES else []
    overrides = _split_stage_overrides(args, names)
    cfg: PipelineRunConfig = build_config(args)
    return run_pipeline(cfg, overrides)


def run_status(args: argparse.Namespace) -> int:
    cfg: PipelineStatusConfig = build_config(args)
    status = collect_status(Path(cfg.run))
    if cfg.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(status_table(status))
        print()
        print(eval_table(status))
    return 0


def run_report(args: argparse.Namespace) -> int:
    cfg: PipelineReportConfig = build_config(args)
    run = Path(cfg.run)
    report, plots = write_report(run)
    status = collect_status(run)
    print(status_table(status))
    print()
    print(eval_table(status))
    print(
        f"\nreport: {report}" + (f"\nplots:  {', '.join(str(p) for p in plots)}" if plots else "")
    )
    return 0


def run_run_stage(args: argparse.Namespace) -> int:
    """One stage of a recorded run (what a Slurm or nemo-run job executes)."""
    import os
    import subprocess

    cfg: RunStageConfig = build_config(args)
    run = Path(cfg.workdir).resolve()
    data = RunState(run).read()
    # The recorded DAG (recipe and overrides applied when the run was planned).
    pipeline = Pipeline(
        data["recipe"], [Stage.from_dict(d) for d in data["dag"]], data.get("inputs")
    )
    result = run_stage(pipeline, run, cfg.stage)
    if result.state == "interrupted" and os.environ.get("SLURM_JOB_ID"):
        # Preempted or at the time limit: the trainer has saved; requeue this job, which
        # keeps its id (its dependents keep waiting) and resumes from the checkpoint.
        _log(
            f"qmath pipeline: {args.stage} interrupted; requeueing job {os.environ['SLURM_JOB_ID']}"
        )
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        # Wait for Slurm to end this run of the job: exiting first could let the job end
        # as COMPLETED before the requeue takes effect.
        time.sleep(120)
        return 0
    if result.state == "failed":
        _log(
            f"qmath: error: stage {cfg.stage} failed: {result.error}\n"
            f"  log: {run / cfg.stage / 'log.txt'}"
        )
        return result.returncode or 1
    return 0 if result.state == "done" else INTERRUPTED


class _RunArgs(ConfigArgs):
    """The trailing overrides of ``pipeline run`` are mostly ``STAGE.KEY=VALUE``: stage
    names are not fields of its config, so every trailing ``key.sub=value`` word counts."""

    def split_overrides(self, args: list[str], parser: argparse.ArgumentParser) -> int:
        start = len(args)
        while (
            start > 0
            and _OVERRIDE_WORD.match(args[start - 1])
            and not takes_value(parser, args, start - 1)
        ):
            start -= 1
        return start


def _run_flags(p: argparse.ArgumentParser) -> None:
    a = _RunArgs(p, PipelineRunConfig)
    a.add("recipe", required=True, help=f"pipeline recipe: {', '.join(RECIPES)}")
    a.add("workdir", required=True, help="the run's directory (RUN/<stage>/, RUN/pipeline.json)")
    a.add("executor", choices=executor_names(), help="where stages run (default local)")
    a.add(
        "stages",
        convert=lambda v: [x for x in v.split(",") if x],
        help="comma-separated: run only these stages",
    )
    a.add("from_stage", "--from", help="rerun this stage and everything downstream of it")
    a.add("dry_run", help="print the stages' commands (slurm: the sbatch scripts); run nothing")
    a.add("scheduler.wait", "--wait", help="slurm / nemo-run: block until the jobs end")
    a.add("scheduler.slurm_partition", "--slurm-partition")
    a.add("scheduler.slurm_account", "--slurm-account")
    a.finish(
        overrides_help="STAGE.KEY=VALUE: a stage's setting (a flag or override of its command)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pipeline", help="the Qwen2.5-Math loop as one resumable command (run, status, report)"
    )
    sub = p.add_subparsers(dest="pipeline_command", metavar="COMMAND", required=True)
    r = sub.add_parser(
        "run",
        help="run (or resume) a pipeline recipe",
        description="Runs the recipe's stages that are not done, in DAG order; a done stage is "
        "skipped, a changed setting refused (--from reruns a stage and all after it).",
    )
    build_later(r, _run_flags)
    r.set_defaults(func=run_run)
    s = sub.add_parser("status", help="every stage's state, time and headline metrics")
    a = ConfigArgs(s, PipelineStatusConfig)
    a.add("run", "run", help="the run directory")
    a.add("json", help="one JSON object: stages, eval")
    a.finish()
    s.set_defaults(func=run_status)
    rep = sub.add_parser("report", help="write RUN/report.md and PNG plots; print the table")
    a = ConfigArgs(rep, PipelineReportConfig)
    a.add("run", "run", help="the run directory")
    a.finish()
    rep.set_defaults(func=run_report)
    one = sub.add_parser("run-stage", help="run one stage of a recorded run (executors' jobs)")
    a = ConfigArgs(one, RunStageConfig)
    a.add("workdir", required=True, help="the run directory")
    a.add("stage", required=True, help="the stage to run")
    a.finish()
    one.set_defaults(func=run_run_stage)

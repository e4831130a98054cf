"""``qmath train STAGE --recipe NAME [--config FILE.yaml] [key.sub=value ...] [--dry-run]``.

Each stage is a module with a ``STAGE`` (:class:`qmath_megatron.training.task.Stage`);
registering a new ``qmath train <stage>`` is one line in :data:`STAGES`. The job is the
recipe's, then the YAML file's values, then the overrides, type-checked by the same code as
every command's settings (:mod:`qmath_megatron.config.overrides`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmath_megatron.config.cli import build_later
from qmath_megatron.config.overrides import apply_overrides, apply_values, flatten, load_mapping
from qmath_megatron.config.recipes import build_recipe
from qmath_megatron.utils.run_summary import (
    format_run_summary,
    metric_trend,
    print_run_summary,
    read_records,
)


@dataclass(frozen=True)
class StageEntry:
    """A ``qmath train <name>`` subcommand. Its parser needs the name, the help and the
    recipe names (``recipes``: the module with ``RECIPES``, config dataclasses only); the
    module defining the ``STAGE`` (``task``: torch, Megatron) is imported to run it, so that
    ``qmath train --help`` does not import torch."""

    name: str
    help: str
    recipes: str
    task: str


# One line per stage (its help is the Stage's; tests/unit/test_cli.py checks they agree).
STAGES = (
    StageEntry(
        "pretrain",
        "continued pretraining on Megatron-Core",
        "qmath_megatron.pretrain.recipes",
        "qmath_megatron.pretrain.task",
    ),
    StageEntry(
        "sft",
        "supervised fine-tuning (CoT/TIR) on packed sequences",
        "qmath_megatron.sft.recipes",
        "qmath_megatron.sft.task",
    ),
    StageEntry(
        "rm",
        "reward model (Qwen2.5-Math-RM): listwise loss over groups of labelled responses",
        "qmath_megatron.reward_model.recipes",
        "qmath_megatron.reward_model.task",
    ),
    StageEntry(
        "grpo",
        "GRPO with vLLM rollout engines that receive the trainer's weights every step",
        "qmath_megatron.rl.recipes",
        "qmath_megatron.rl.task",
    ),
)


def _entry(name: str) -> StageEntry:
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown training stage {name!r}")


def load_stage(name: str):
    """The :class:`Stage` called ``name`` (``pretrain``, ``sft``, ...)."""
    return importlib.import_module(_entry(name).task).STAGE


def resolve_job(
    recipe: str, config_file: str | None, overrides: list[str], stage: str = "pretrain"
) -> Any:
    """Recipe, then the YAML file's values, then command-line overrides (all type-checked)."""
    recipes = importlib.import_module(_entry(stage).recipes).RECIPES
    job = build_recipe(recipes, recipe, f"{stage} recipe")
    if config_file:
        job = apply_values(job, flatten(load_mapping(config_file)))
    return apply_overrides(job, overrides)


def _run(args: argparse.Namespace) -> int:
    stage = load_stage(args.train_command)
    job = resolve_job(args.recipe, args.config, args.overrides, stage.name)
    if args.dry_run:
        from qmath_megatron.training.dry_run import dry_run, format_dry_run

        plan = dry_run(job, args.world_size, iterations=stage.task.planned_iters(job))
        extra = getattr(stage.task, "dry_run_extra", None)  # a stage's own plan (GRPO: engines)
        extra_plan, extra_text = extra(job, plan) if extra else ({}, "")
        plan.update(extra_plan)
        text = format_dry_run(plan) + (f"\n{extra_text}" if extra_text else "")
        print(json.dumps(plan, indent=2, default=str) if args.json else text)
        return 0
    from qmath_megatron.parallel.runtime import shutdown
    from qmath_megatron.training.checkpointing import latest_iteration
    from qmath_megatron.training.loop import train

    resume_root = job.checkpoint.load or job.checkpoint.save
    start_iteration = (latest_iteration(resume_root) if resume_root else None) or 0
    task, started = stage.task(job), time.time()
    try:
        history = train(job, task)
    finally:
        shutdown()
    if os.environ.get("RANK", "0") == "0":  # rank 0 (torchrun sets RANK; one process: unset)
        run = RunResult(
            stage=stage.name,
            job=getattr(task, "job", job),  # the job as the task prepared it (data paths)
            recipe=args.recipe,
            history=history,
            start_iteration=start_iteration,
            total_iters=_total_iters(task, stage, job),
            seconds=time.time() - started,
            command=_command(args),
        )
        print_run_summary(train_summary(run))
    return 0


# ---- the end-of-run summary ------------------------------------------------------------
# Headline metrics per stage: (key in metrics.jsonl, label, higher is better). The loop logs
# the task's loss as `loss` and its other report entries with `_` for spaces; evaluations
# log `val_*` (training/task.py, reward_model/task.py); GRPO's rollouts log `reward` (the
# mean reward) and `accuracy` (the verifier's) (rl/rollout.py, rl/reward.py).
HEADLINE_METRICS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "pretrain": (("loss", "lm loss", False), ("val_loss", "val loss", False)),
    "sft": (("loss", "lm loss", False), ("val_loss", "val loss", False)),
    "rm": (
        ("loss", "rm loss", False),
        ("pairwise_accuracy", "pairwise acc", True),
        ("val_rm_loss", "val rm loss", False),
        ("val_pairwise_accuracy", "val pairwise acc", True),
    ),
    "grpo": (("reward", "reward mean", True), ("accuracy", "verifier acc", True)),
}


@dataclass
class RunResult:
    """What the summary of one ``qmath train`` run reads."""

    stage: str
    job: Any  # the job as run
    recipe: str
    history: list[dict]  # the loop's logged metrics of this run
    start_iteration: int  # the checkpoint's iteration the run resumed from (0: fresh)
    total_iters: int | None  # the run's planned iterations (None: unknown)
    seconds: float
    command: str  # the command that runs (and resumes) this job


def _total_iters(task: Any, stage: Any, job: Any) -> int | None:
    try:
        return int(task.total_iters())
    except Exception:  # a summary never fails the run
        try:
            return stage.task.planned_iters(job)
        except Exception:
            return None


def _command(args: argparse.Namespace) -> str:
    words = ["qmath", "train", args.train_command, "--recipe", args.recipe]
    words += ["--config", args.config] if args.config else []
    return shlex.join(words + list(args.overrides))


def _sibling_recipe(recipe: str, stage: str) -> str:
    """The recipe of ``stage`` that goes with ``recipe``: the tiny CPU one after a tiny CPU
    run, the one of the same model size otherwise."""
    names = list(importlib.import_module(_entry(stage).recipes).RECIPES)
    if recipe.startswith("tiny_cpu"):
        return next((n for n in names if n.startswith("tiny_cpu")), names[0])
    size = re.search(r"_(\d+(?:p\d+)?b)(?:_|$)", recipe)
    for name in names:
        if size and re.search(rf"_{size.group(1)}(?:_|$)", name):
            return name
    return next((n for n in names if not n.startswith("tiny_cpu")), names[0])


def _hf_dir(save: str) -> str:
    return save.rstrip("/") + "_hf"


def _convert(save: str, tokenizer: str | None) -> str:
    words = ["qmath", "convert", "mcore-to-hf", "--ckpt", save, "--out", _hf_dir(save)]
    return shlex.join(words + (["--tokenizer", tokenizer] if tokenizer else []))


def next_commands(stage: str, recipe: str, save: str | None, tokenizer: str | None) -> list[str]:
    """The pipeline's next steps after ``stage`` (docs/pipeline.md), with this run's paths;
    upper-case words (``SFT_CKPT/``) are for the user to fill in."""
    ckpt = save or "CKPT/"
    tiny = recipe.startswith("tiny_cpu")  # the tiny recipes generate their own data
    if stage == "pretrain":
        words = ["qmath", "train", "sft", "--recipe", _sibling_recipe(recipe, "sft")]
        words += [] if tiny else ["data.prefix=SFT_PREFIX"]
        words += [f"model.init_from={ckpt}", f"checkpoint.save={ckpt.rstrip('/')}_sft"]
        return [shlex.join(words)]
    if stage == "sft":
        return [_convert(ckpt, tokenizer)]
    if stage == "rm":
        grpo = ["qmath", "train", "grpo", "--recipe", _sibling_recipe(recipe, "grpo")]
        grpo += ["model.init_from=SFT_CKPT/", f"rl.rm_model={_hf_dir(ckpt)}"]
        grpo += [] if tiny else ["data.prompts=RL_PROMPTS.jsonl"]
        return [_convert(ckpt, tokenizer), shlex.join(grpo)]
    if stage == "grpo":
        evaluate = ["qmath", "eval", "--model", _hf_dir(ckpt), "--benchmarks", "gsm8k,math500"]
        evaluate += ["--output", ckpt.rstrip("/") + "_eval"]
        return [_convert(ckpt, tokenizer), shlex.join(evaluate)]
    return []


def train_summary(run: RunResult) -> str:
    """The block ``qmath train`` prints at the end of a run (rank 0), of a run stopped by a
    signal, the wall-clock limit or ``train.exit_after_iters`` too (then the next command
    is the one that resumes it)."""
    from qmath_megatron.training.checkpointing import latest_iteration

    job, save = run.job, run.job.checkpoint.save
    last = run.history[-1]["iteration"] if run.history else run.start_iteration
    if last == run.start_iteration:
        span = f"no iterations left after iteration {last}"
    elif run.start_iteration:
        span = f"iterations {run.start_iteration + 1}-{last} (resumed from {run.start_iteration})"
    else:
        span = f"{last} iterations"
    stopped = run.total_iters is not None and last < run.total_iters
    title = (
        f"stopped: {run.stage} at iteration {last} of {run.total_iters}, {span} "
        f"in {run.seconds:.1f}s"
        if stopped
        else f"done: {run.stage}, {span} in {run.seconds:.1f}s"
    )
    saved = latest_iteration(save) if save and Path(save).is_dir() else None
    jsonl = job.logging.jsonl or (str(Path(save) / "metrics.jsonl") if save else None)
    outputs = {
        "checkpoint": (
            f"{save} (iteration {saved})"
            if saved is not None
            else ("none saved" if save else "none (checkpoint.save not set)")
        ),
        "metrics": jsonl if jsonl and Path(jsonl).is_file() else None,
        "tensorboard": job.logging.tensorboard_dir,
    }
    # the file holds the whole run (a resumed one's earlier iterations too)
    records = read_records(jsonl) if outputs["metrics"] else run.history
    metrics = {
        label: metric_trend(records, key, higher_is_better=higher)
        for key, label, higher in HEADLINE_METRICS.get(run.stage, ())
    }
    tokenizer = getattr(getattr(job, "data", None), "tokenizer", None)
    commands = (
        [run.command]  # the same command resumes from the checkpoint
        if stopped and saved is not None
        else next_commands(run.stage, run.recipe, save, tokenizer)
    )
    return format_run_summary(title, outputs, metrics, commands)


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="training stages (launch with torchrun for >1 rank)"
    )
    sub = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    for entry in STAGES:
        p = sub.add_parser(entry.name, help=entry.help)
        build_later(p, functools.partial(_stage_flags, entry))
        p.set_defaults(func=_run)


def _stage_flags(entry: StageEntry, p: argparse.ArgumentParser) -> None:
    recipes = importlib.import_module(entry.recipes).RECIPES
    p.add_argument("--recipe", required=True, help=f"one of: {', '.join(recipes)}")
    p.add_argument("--config", default=None, help="YAML file of overrides (nested like the config)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print config, layout, parameter counts, memory estimate, token budget; no GPU",
    )
    p.add_argument("--world-size", type=int, default=None, help="GPUs to plan for in --dry-run")
    p.add_argument("--json", action="store_true", help="--dry-run output as JSON")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. parallel.tp=2 optim.lr=1e-4")

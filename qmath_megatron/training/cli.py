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
from dataclasses import dataclass
from typing import Any

from qmath_megatron.config.cli import build_later
from qmath_megatron.config.overrides import apply_overrides, apply_values, flatten, load_mapping
from qmath_megatron.config.recipes import build_recipe


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
    from qmath_megatron.training.loop import train

    try:
        train(job, stage.task(job))
    finally:
        shutdown()
    return 0


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

"""``qmath train STAGE --recipe NAME [key.sub=value ...] [--dry-run]``.

Each stage is a module with a ``STAGE`` (:class:`qmath_megatron.training.task.Stage`);
registering a new ``qmath train <stage>`` is one line in :data:`STAGE_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

# One line per stage (module defining STAGE). Imported when the parser is built: keep the
# modules light (import Megatron inside functions).
STAGE_MODULES = (
    "qmath_megatron.pretrain.task",
    "qmath_megatron.sft.task",
    "qmath_megatron.reward_model.task",
    "qmath_megatron.rl.task",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def load_stage(name: str):
    """The :class:`Stage` called ``name`` (``pretrain``, ``sft``, ...)."""
    for module in STAGE_MODULES:
        stage = importlib.import_module(module).STAGE
        if stage.name == name:
            return stage
    raise KeyError(f"unknown training stage {name!r}")


def resolve_job(
    recipe: str, config_file: str | None, overrides: list[str], stage: str = "pretrain"
):
    """Recipe, then the YAML file's values, then command-line overrides (all type-checked)."""
    import yaml

    from qmath_megatron.config.overrides import apply_overrides

    job = load_stage(stage).recipe(recipe)
    if config_file:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: top level must be a mapping")
        job = apply_overrides(job, _flatten(data))
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
    for module in STAGE_MODULES:
        stage = importlib.import_module(module).STAGE
        p = sub.add_parser(stage.name, help=stage.help)
        p.add_argument("--recipe", required=True, help=f"one of: {', '.join(stage.recipes)}")
        p.add_argument(
            "--config", default=None, help="YAML file of overrides (nested like the config)"
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="print config, layout, parameter counts, memory estimate, token budget; no GPU",
        )
        p.add_argument("--world-size", type=int, default=None, help="GPUs to plan for in --dry-run")
        p.add_argument("--json", action="store_true", help="--dry-run output as JSON")
        p.add_argument(
            "overrides", nargs="*", help="key.sub=value, e.g. parallel.tp=2 optim.lr=1e-4"
        )
        p.set_defaults(func=_run)

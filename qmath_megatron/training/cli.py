"""``qmath train pretrain --recipe NAME [key.sub=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _flatten(data: dict[str, Any], prefix: str = "") -> list[str]:
    items = []
    for key, value in data.items():
        if isinstance(value, dict):
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


def resolve_job(recipe: str, config_file: str | None, overrides: list[str]):
    """Recipe, then the YAML file's values, then command-line overrides (all type-checked)."""
    import yaml

    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.recipes import get_recipe

    job = get_recipe(recipe)
    if config_file:
        with open(config_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: top level must be a mapping")
        job = apply_overrides(job, _flatten(data))
    return apply_overrides(job, overrides)


def _pretrain(args: argparse.Namespace) -> int:
    job = resolve_job(args.recipe, args.config, args.overrides)
    if args.dry_run:
        from qmath_megatron.training.dry_run import dry_run, format_dry_run

        plan = dry_run(job, args.world_size)
        print(json.dumps(plan, indent=2, default=str) if args.json else format_dry_run(plan))
        return 0
    from qmath_megatron.parallel.runtime import shutdown
    from qmath_megatron.training.pretrain import pretrain

    try:
        pretrain(job)
    finally:
        shutdown()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from qmath_megatron.recipes import RECIPES

    train = subparsers.add_parser(
        "train", help="training stages (launch with torchrun for >1 rank)"
    )
    sub = train.add_subparsers(dest="train_command", metavar="STAGE", required=True)
    p = sub.add_parser("pretrain", help="continued pretraining on Megatron-Core")
    p.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--config", default=None, help="YAML file of overrides (nested like the config)")
    p.add_argument("--dry-run", action="store_true",
                   help="print config, layout, parameter counts, memory estimate, token budget; no GPU")  # fmt: skip
    p.add_argument("--world-size", type=int, default=None, help="GPUs to plan for in --dry-run")
    p.add_argument("--json", action="store_true", help="--dry-run output as JSON")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. parallel.tp=2 optim.lr=1e-4")
    p.set_defaults(func=_pretrain)

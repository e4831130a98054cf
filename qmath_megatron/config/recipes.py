"""What every stage's recipe module shares: the registry of named recipes and the defaults
of the tiny CPU recipes.

A recipe is a function returning a job; its name (``qmath train <stage> --recipe NAME``)
is the function's ``__name__`` unless the registry is given another. The pretrain, SFT,
reward-model and GRPO recipes (``pretrain/recipes.py``, ``sft/recipes.py``,
``reward_model/recipes.py``, ``rl/recipes.py``) build their tables with
:func:`recipe_registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from qmath_megatron.config.job import CheckpointConfig, JobConfig, LoggingConfig, ModelConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig

J = TypeVar("J", bound=JobConfig)
Recipe = Callable[[], J]

# The 2-layer model with Qwen2.5's vocabulary (the real tokenizer works with it).
TINY_CPU_FLAVOR = "tiny-qwen-vocab"


def recipe_registry(*recipes: Recipe | tuple[str, Recipe]) -> dict[str, Recipe]:
    """``{name: recipe}`` in the order given: a function stands under its ``__name__``, a
    ``(name, function)`` pair under ``name`` (variants such as fp8 versions). ValueError
    when a name comes twice or a function has no usable name (a lambda needs a pair)."""
    table: dict[str, Recipe] = {}
    for item in recipes:
        name, fn = item if isinstance(item, tuple) else (item.__name__, item)
        if not name.isidentifier():
            raise ValueError(f"recipe {fn!r} needs a name: pass (name, function)")
        if name in table:
            raise ValueError(f"recipe {name!r} registered twice")
        table[name] = fn
    return table


def build_recipe(recipes: dict[str, Callable[[], J]], name: str, what: str = "recipe") -> J:
    """The job of recipe ``name`` (KeyError listing the known names otherwise; ``what``
    names the kind in the message, e.g. "sft recipe")."""
    if name not in recipes:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(recipes)}")
    return recipes[name]()


def tiny_cpu_job(
    job_type: type[J],
    name: str,
    seq_length: int,
    *,
    save_interval: int | None = 10,
    keep_last: int | None = 2,
    **sections: Any,
) -> J:
    """A tiny CPU recipe's job: named ``name``, checkpoints under ``runs/<name>`` every
    ``save_interval`` steps (keeping ``keep_last``), the :data:`TINY_CPU_FLAVOR` model at
    ``seq_length``, one process without model parallelism, fp32 (what the CPU runs), a log
    line every step. ``sections`` (``data``, ``optim``, ``train``, ...) complete the job and
    may replace any of these (e.g. ``model=`` for another flavor)."""
    defaults: dict[str, Any] = {
        "model": ModelConfig(flavor=TINY_CPU_FLAVOR, seq_length=seq_length),
        "parallel": ParallelConfig(),
        "precision": PrecisionConfig(dtype="fp32"),
        "checkpoint": CheckpointConfig(
            save=f"runs/{name}", save_interval=save_interval, keep_last=keep_last
        ),
        "logging": LoggingConfig(log_interval=1),
    }
    return job_type(name=name, **(defaults | sections))

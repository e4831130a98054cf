"""Resuming with changed settings: refuse what would silently change the run.

Every checkpoint stores the job's resolved config (``qmath_job.json`` in the iteration
directory). On resume the new job is compared with it, as Megatron-LM checks its
arguments on load (``check_checkpoint_args`` for the model; the scheduler's
``_check_and_set`` for learning rates and schedule lengths):

- *Refused* (the run would no longer be the one the checkpoint belongs to): the model
  (flavor, sequence length, RoPE), the optimizer's hyper-parameters, the LR/WD schedule,
  the run length, the global batch size, the seed, and the data (blend, split, dataset
  prefix, tokenizer, epochs). The message lists each changed key with old -> new.
  ``checkpoint.allow_changed_settings=true`` resumes anyway with the new values (the LR
  schedule then takes the new values, Megatron-LM's ``--override-opt_param-scheduler``)
  and logs the same list as a warning.
- *Applied, with a warning listing them* (safe: the same optimizer steps, computed
  differently, or bookkeeping): the parallel layout (checkpoints reshard), micro batch
  size, recompute, logging, checkpoint cadence and paths, eval cadence, exit settings,
  the non-finite policy, communication overlap, ``model.init_from`` (ignored on resume),
  the job name, GRPO's rollout-engine layout (placement, engines, engine TP/GPUs/handles,
  weight transfer, bucket size).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

JOB_FILE = "qmath_job.json"

# Keys (dotted prefixes) whose change is applied with a warning; everything else refuses.
SAFE_PREFIXES = (
    "name",
    "parallel.",
    "data.micro_batch_size",
    "data.cache_dir",
    "model.recompute",
    "model.init_from",
    "logging.",
    "checkpoint.",
    "train.eval_interval",
    "train.eval_iters",
    "train.exit_after_iters",
    "train.exit_signals",
    "train.exit_duration_minutes",
    "train.skip_nonfinite",
    "train.max_consecutive_nonfinite",
    "optim.overlap_grad_reduce",
    "optim.overlap_param_gather",
    "precision.fp8_amax",
    # GRPO's rollout-engine layout (where engines run, how many, how weights reach them):
    # the same optimizer steps whichever engines sample them (request seeds are per prompt).
    "rl.placement",
    "rl.engines",
    "rl.engine_tp",
    "rl.engine_gpus",
    "rl.engine_handles",
    "rl.weight_transfer",
    "rl.bucket_mb",
    "rl.gpu_memory_utilization",
    "rl.rm_batch_size",
)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(refused, safe)``: lines ``key: old -> new`` for every key that differs.

    ``saved`` and ``current`` are nested config dicts (``to_dict(job)``). A key present on
    one side only counts as changed unless it is new with its value unset (None), so
    adding a config field with a neutral default does not block resuming old runs.
    """
    old, new = _flatten(saved), _flatten(current)
    refused, safe = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key not in old and b is None):
            continue
        line = f"{key}: {json.dumps(a)} -> {json.dumps(b)}"
        (safe if key.startswith(SAFE_PREFIXES) else refused).append(line)
    return refused, safe


def check_resume(iter_dir: Path, current: dict[str, Any], allow_changed: bool) -> bool:
    """Compare with the checkpoint's job; raise ValueError on refused changes (unless
    ``allow_changed``). Returns True when refused changes were allowed through (the
    scheduler must then take the new values)."""
    path = Path(iter_dir) / JOB_FILE
    if not path.is_file():
        logger.warning("%s has no %s: cannot check the resumed settings", iter_dir, JOB_FILE)
        return False
    refused, safe = changed_settings(json.loads(path.read_text()), current)
    if safe:
        logger.warning("resuming with changed settings (applied): %s", "; ".join(safe))
    if refused and not allow_changed:
        raise ValueError(
            f"resuming {iter_dir} with changed settings that would alter the run: "
            f"{'; '.join(refused)}. Restore them, start a new run (another checkpoint.save, "
            "model.init_from for the weights), or pass checkpoint.allow_changed_settings=true "
            "to resume with the new values"
        )
    if refused:
        logger.warning(
            "resuming with changed settings (allowed by checkpoint.allow_changed_settings): %s",
            "; ".join(refused),
        )
    return bool(refused)

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

Which keys are safe is said where they are defined: their config dataclass fields (or whole
sections) carry :data:`~qmath_megatron.config.overrides.RESUME_SAFE` metadata.

The data itself is checked too: a dataset regenerated under the same path keeps the config
unchanged. Each checkpoint stores the task's data fingerprint (``qmath_data.json``: per
dataset, each file's size and SHA-256, or for files above 64 MiB their mtime and the SHA-256
of their first and last MiB, so multi-GB ``.bin`` files are not re-read); a changed file is
refused like a refused setting. Checkpoints without it resume unchecked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qmath_megatron.config.overrides import RESUME_SAFE, flatten, marked_fields, to_dict
from qmath_megatron.data.shards import path_fingerprint

logger = logging.getLogger(__name__)

JOB_FILE = "qmath_job.json"
DATA_FILE = "qmath_data.json"


def resume_safe_keys(job: Any) -> set[str]:
    """The dotted keys of ``job`` whose change is applied on resume: the fields (and whole
    sections) marked with :data:`~qmath_megatron.config.overrides.RESUME_SAFE` metadata in
    their config dataclasses."""
    return marked_fields(job, RESUME_SAFE)


def is_resume_safe(key: str, safe: set[str]) -> bool:
    """Whether ``key`` (``"rl.engines"``) is, or lies in a section that is, in ``safe``."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in safe for i in range(1, len(parts) + 1))


def changed_settings(saved: dict[str, Any], current: Any) -> tuple[list[str], list[str]]:
    """``(refused, safe)``: lines ``key: old -> new`` for every key that differs.

    ``saved`` is the checkpoint's nested config dict (``to_dict(job)``), ``current`` the
    job being resumed (its dataclasses say which keys are safe). A key present on one side
    only counts as changed unless it is new with its value unset (None), so adding a config
    field with a neutral default does not block resuming old runs.
    """
    old, new = flatten(saved), flatten(to_dict(current))
    safe_keys = resume_safe_keys(current)
    refused, safe = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or (key not in old and b is None):
            continue
        line = f"{key}: {json.dumps(a)} -> {json.dumps(b)}"
        (safe if is_resume_safe(key, safe_keys) else refused).append(line)
    return refused, safe


def check_resume(iter_dir: Path, current: Any, allow_changed: bool) -> bool:
    """Compare the job ``current`` with the checkpoint's; raise ValueError on refused
    changes (unless ``allow_changed``). Returns True when refused changes were allowed
    through (the scheduler must then take the new values)."""
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


def dataset_fingerprint(prefix: str | Path, suffixes: tuple[str, ...]) -> dict[str, Any]:
    """``{file name: [size, digest]}`` for the files ``PREFIX + suffix`` that exist."""
    files = [Path(f"{prefix}{suffix}") for suffix in suffixes]
    return {p.name: path_fingerprint(p)[p.name] for p in files if p.is_file()}


def changed_data(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Lines ``dataset: FILE changed since the checkpoint (...)`` for every file of a dataset
    named on both sides whose fingerprint differs (a dataset named on one side only is a
    changed setting, which :func:`check_resume` reports). A file missing now is left to the
    task's loading to report: ranks that never read a file (GRPO's prompts are read by rank 0)
    may not see it."""
    lines = []
    for name in sorted(set(saved) & set(current)):
        old, new = saved[name], current[name]
        for file in sorted(set(old) | set(new)):
            a, b = old.get(file), new.get(file)
            if a == b or b is None:
                continue
            if a is None:
                what = "appeared"
            elif a[0] != b[0]:
                what = f"changed (size {a[0]} -> {b[0]})"
            else:
                what = "changed (same size, different content)"
            lines.append(f"{name}: {file} {what} since the checkpoint")
    return lines


def check_data(iter_dir: Path, current: dict[str, Any], allow_changed: bool) -> None:
    """Compare the task's data fingerprint ``current`` with the checkpoint's; raise
    ValueError naming each changed dataset file (unless ``allow_changed``)."""
    path = Path(iter_dir) / DATA_FILE
    if not path.is_file():
        logger.warning("%s has no %s: cannot check that the data is unchanged", iter_dir, DATA_FILE)
        return
    changed = changed_data(json.loads(path.read_text()), current)
    if changed and not allow_changed:
        raise ValueError(
            f"resuming {iter_dir} with changed data: {'; '.join(changed)}. Restore the data, "
            "start a new run, or pass checkpoint.allow_changed_settings=true to resume anyway"
        )
    if changed:
        logger.warning(
            "resuming with changed data (allowed by checkpoint.allow_changed_settings): %s",
            "; ".join(changed),
        )

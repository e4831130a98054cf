"""The end-of-run summary every trainer and data tool prints: where the outputs are, the
headline counts or metrics, and the next command to run.

One shape for every command::

    qmath: done: sft, 30 iterations in 41.2s
      checkpoint: runs/tiny_cpu_sft (iteration 30)
      metrics:    runs/tiny_cpu_sft/metrics.jsonl
      lm loss:    first 11.93 (it 1) -> last 2.41 (it 30), best 2.38 (it 28)
      next:       qmath convert mcore-to-hf --ckpt runs/tiny_cpu_sft --out runs/tiny_cpu_sft_hf

:func:`format_run_summary` builds the block, :func:`metric_trend` the first/last/best of one
metric over a run's records (a ``metrics.jsonl``, read by :func:`read_records`). Pure
Python: no project imports.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Value = Any  # a Trend, a count (int), a float, a string; None: the line is left out


@dataclass(frozen=True)
class Trend:
    """First, last and best value of one metric, each with its step (iteration)."""

    first: tuple[int, float]
    last: tuple[int, float]
    best: tuple[int, float]
    higher_is_better: bool = False

    def __str__(self) -> str:
        (i0, v0), (i1, v1), (ib, vb) = self.first, self.last, self.best
        return f"first {_num(v0)} (it {i0}) -> last {_num(v1)} (it {i1}), best {_num(vb)} (it {ib})"


def _num(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL file, in order (unreadable lines and a missing file:
    skipped / empty, as a summary must never fail the run it reports on)."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def metric_trend(
    records: Iterable[Mapping[str, Any]],
    key: str,
    *,
    higher_is_better: bool = False,
    step_key: str = "iteration",
) -> Trend | None:
    """First/last/best of ``key`` over ``records`` (None when no record has a finite value).

    Records are ordered by ``step_key`` (a record without one takes the position after the
    previous record's step); a step logged twice (a resumed run that recomputed steps its
    checkpoint did not hold) counts once, with its last value. Best is the minimum, or the
    maximum with ``higher_is_better`` (rewards, accuracies); ties go to the earliest step.
    """
    values: dict[int, float] = {}
    step = 0
    for record in records:
        s = record.get(step_key)
        step = s if isinstance(s, int) and not isinstance(s, bool) else step + 1
        v = record.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            values[step] = float(v)
    if not values:
        return None
    points = sorted(values.items())
    sign = -1.0 if higher_is_better else 1.0
    best = min(points, key=lambda p: (sign * p[1], p[0]))
    return Trend(points[0], points[-1], best, higher_is_better)


def count(value: Any) -> int:
    """A count a report gives as a number or as ``{reason: n}``."""
    if isinstance(value, Mapping):
        return sum(int(v) for v in value.values())
    return int(value or 0)


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _num(value)
    return str(value)


def format_run_summary(
    title: str,
    outputs: Mapping[str, str | None],
    metrics: Mapping[str, Value] | None = None,
    next_command: str | Sequence[str] | None = None,
) -> str:
    """The summary block: ``qmath: TITLE``, then one aligned ``label: value`` line per
    output, per metric (a :class:`Trend` shows first/last/best; ints get thousands
    separators) and per next command (``None`` values are left out)."""
    rows = [(k, str(v)) for k, v in outputs.items() if v is not None]
    rows += [(k, _text(v)) for k, v in (metrics or {}).items() if v is not None]
    commands = [next_command] if isinstance(next_command, str) else list(next_command or [])
    rows += [("next" if i == 0 else "", c) for i, c in enumerate(commands)]
    width = max((len(k) for k, _ in rows), default=0) + 1
    lines = [f"qmath: {title}"]
    for label, value in rows:
        head = f"{label}:" if label else ""
        lines.append(f"  {head:<{width}} {value}")
    return "\n".join(lines)


def print_run_summary(text: str, *, stderr: bool = False) -> None:
    """Print the block (to stderr when the command's stdout is machine-read JSON)."""
    stream = sys.stderr if stderr else sys.stdout
    stream.flush()
    print(text, file=stream, flush=True)

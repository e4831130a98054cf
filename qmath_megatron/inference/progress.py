"""Progress lines with a rate and an ETA, one format for every generating tool (``qmath
eval``, ``qmath data rft``, ``qmath data rl-prompts``, ``qmath data score`` /
``synthesize``) and for the transformers engine inside a long ``generate`` call.

Generation on a CPU takes minutes to hours; a tool that prints nothing for that long cannot
be told apart from one that hangs (or is about to be killed for memory). A line reads::

    generated 96/500 problems, 4m10s elapsed, 23.0 problems/min, ETA 17m34s

:class:`Progress` counts against a known total. :class:`ShardProgress` is for the sharded
data tools, which learn how many records a shard holds only by reading it: it measures
the part of the shard read so far by the byte offsets of its records (plain JSONL; for
compressed and Parquet input it reports the count and the rate only).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h04m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(per_second: float, unit: str) -> str:
    """Per second, or per minute below one a second (CPU generation is that slow)."""
    if per_second >= 1:
        return f"{per_second:,.1f} {unit}/s"
    return f"{per_second * 60:,.1f} {unit}/min"


class Progress:
    """``done/total unit, elapsed, rate, ETA`` lines through ``log``.

    ``update(done)`` logs when ``every_s`` seconds have passed since the last line (or
    since the start); ``every_s=0`` logs at every update. ``done`` may be fractional (a
    batch part-way through its steps); the line shows whole units.
    """

    def __init__(
        self,
        total: float | None,
        unit: str = "items",
        *,
        label: str = "",
        log: Log = stderr_log,
        every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.unit, self.label, self.log = total, unit, label, log
        self.every_s, self.clock = every_s, clock
        self.start = self.last = clock()
        self.lines = 0

    def status(self, done: float, note: str = "") -> str:
        elapsed = self.clock() - self.start
        count = f"{int(done):,}" + (f"/{int(self.total):,}" if self.total is not None else "")
        parts = [f"{count} {self.unit}", f"{format_duration(elapsed)} elapsed"]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(format_rate(rate, self.unit))
            if self.total is not None:
                parts.append(f"ETA {format_duration(max(self.total - done, 0) / rate)}")
        return ", ".join(parts) + (f" ({note})" if note else "")

    def update(self, done: float, note: str = "", *, force: bool = False) -> bool:
        """Log a line if one is due (or ``force``); True when it did."""
        now = self.clock()
        if not force and now - self.last < self.every_s:
            return False
        self.last = now
        self.lines += 1
        self.log(self.label + self.status(done, note))
        return True


class ShardProgress:
    """How far a pass over one shard of :mod:`qmath_megatron.data.shards` has come: records
    done, their rate, the part of the shard's bytes read and the shard's ETA."""

    def __init__(
        self,
        shard: Any,
        unit: str = "problems",
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.shard, self.unit, self.clock = shard, unit, clock
        self.start = clock()
        plain = shard.file.format == "jsonl"
        # A byte range of a plain JSONL file, or the whole file (end -1): offsets are bytes.
        self.first = shard.start if plain else None
        self.size = shard.size() if plain else 0

    def fraction(self, last: Any) -> float | None:
        """The part of the shard read up to and including record ``last``; None when the
        input's offsets are not bytes of the file (compressed, Parquet)."""
        offset = getattr(last, "offset", -1)
        if self.first is None or self.size <= 0 or offset < 0:
            return None
        return min(max((offset + last.raw_bytes - self.first) / self.size, 0.0), 1.0)

    def status(self, done: int, last: Any) -> str:
        """``, 2.1 problems/min, 35% of the shard, shard ETA 4m10s`` (to append to a line)."""
        elapsed = self.clock() - self.start
        if done <= 0 or elapsed <= 0:
            return ""
        parts = [format_rate(done / elapsed, self.unit)]
        frac = self.fraction(last)
        if frac:
            parts.append(f"{frac:.0%} of the shard")
            parts.append(f"shard ETA {format_duration(elapsed * (1 - frac) / frac)}")
        return ", " + ", ".join(parts)

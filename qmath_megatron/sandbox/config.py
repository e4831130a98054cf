"""Configuration of the sandboxed executor (limits, isolation level, pool size)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from qmath_megatron.sandbox.uids import DEFAULT_UID_COUNT, DEFAULT_UID_FIRST

ISOLATION_MODES = ("auto", "bwrap", "rlimits")


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one call and the pool that runs calls.

    ``max_processes`` counts the program's own processes *and threads* (RLIMIT_NPROC counts
    tasks on Linux); the few helper processes of the sandbox itself (bwrap, its init) are
    added on top so that ``max_processes=1`` still means "the program may not fork".
    """

    timeout_s: float = 10.0  # wall clock per call; RLIMIT_CPU = ceil(timeout)+1
    memory_mb: int = 1024  # RLIMIT_AS
    max_processes: int = 32  # RLIMIT_NPROC (under the slot's own uid)
    max_output_bytes: int = 65536  # kept per stream; the process is killed past 16x this
    max_file_mb: int = 64  # RLIMIT_FSIZE
    isolation: str = "auto"  # "auto" | "bwrap" | "rlimits"
    require_strong: bool = False  # refuse (SandboxUnavailable) when only weak isolation exists
    python: str = sys.executable  # interpreter inside the sandbox (the venv's, for numpy/sympy)
    workers: int = 4  # calls in parallel
    tmpfs_mb: int = 256  # size of each private tmpfs (/tmp, /var/tmp, /dev/shm) under bwrap
    workdir_root: str | None = None  # where call directories are made (default: temp dir)
    uid_first: int = DEFAULT_UID_FIRST  # per-slot uids are leased from [first, first+count)
    uid_count: int = DEFAULT_UID_COUNT

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, int | float) and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number, got {self.timeout_s!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        _at_least("memory_mb", self.memory_mb, 32)
        _at_least("max_processes", self.max_processes, 1)
        _at_least("max_output_bytes", self.max_output_bytes, 1)
        _at_least("max_file_mb", self.max_file_mb, 1)
        _at_least("workers", self.workers, 1)
        _at_least("tmpfs_mb", self.tmpfs_mb, 1)
        _at_least("uid_first", self.uid_first, 1000)
        _at_least("uid_count", self.uid_count, 1)
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(
                f"isolation must be one of {', '.join(ISOLATION_MODES)}, got {self.isolation!r}"
            )
        if not isinstance(self.python, str) or not self.python:
            raise ValueError("python must be the path of an interpreter")

    @property
    def cpu_limit_s(self) -> int:
        """RLIMIT_CPU soft limit: a CPU-bound program is stopped even if the wall clock lags."""
        return math.ceil(self.timeout_s) + 1


def _at_least(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")

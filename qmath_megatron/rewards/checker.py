"""Answer checking in a process pool with a hard wall-clock limit per check.

math-verify bounds its own work with SIGALRM, which only works on a main thread and does
not stop C-level hangs. Every check therefore runs as its own task in a
``pebble.ProcessPool`` (tasks run on the worker's main thread, so math-verify's alarms
work there too) with a hard ``timeout_s``: a task past it has its worker killed and
replaced, and scores False with status "timeout"; a worker that dies scores False with
status "crash"; an exception in the check scores False with status "error". The run
always goes on, and :attr:`AnswerChecker.stats` counts each kind.

Workers come from a ``forkserver`` context whose server has already imported sympy and
math-verify: forking from the (possibly threaded, CUDA-initialised) evaluation or RL
process is unsafe, and ``spawn`` re-imports sympy for every replacement worker.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qmath_megatron.rewards.equivalence import Convention, Verdict, check_equivalence
from qmath_megatron.rewards.extract import extract_answer

__all__ = ["AnswerChecker", "CheckFn", "CheckResult"]

# (reference, prediction, convention) -> bool, or a Verdict that can report a soft timeout.
CheckFn = Callable[[str, str, Convention], "bool | Verdict"]

_STATUSES = ("ok", "timeout", "crash", "error")
_DEFAULT_CONVENTION = Convention()
_MP_CONTEXT = "forkserver"
# Modules the fork server imports once, so that every (re)started worker is warm.
_PRELOAD = ["qmath_megatron.rewards.equivalence", "math_verify", "sympy"]


@dataclass(frozen=True)
class CheckResult:
    """One checked pair. ``status`` is "ok", "timeout", "crash" or "error"; anything but
    "ok" means the answer could not be checked, and ``equal`` is then False."""

    equal: bool
    status: str

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")
        if self.equal and self.status != "ok":
            raise ValueError("only an 'ok' check can be equal")


def _bind_to_owner(owner_pid: int) -> None:
    """End this worker when the process that owns the checker dies (SIGKILL, OOM killer):
    a killed trainer or ``qmath eval`` leaves no checker workers behind.

    The data tools' pools use a parent-death signal (``data/shards.py`` die_with_parent);
    it cannot serve here: with ``forkserver`` (the default) a worker's parent is the fork
    server, which itself lives as long as any of its children does (each holds its
    "alive" pipe), so the signal would never fire (and this layer-1 package imports no
    other). A daemon thread waits on a pidfd of the owner instead (any start method) and
    exits the worker when the owner has ended; without pidfds it polls."""
    import select

    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:  # the owner died before this worker started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3)
        pidfd = None

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the owner has exited
        else:
            while os.getppid() == owner_pid or _running(owner_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="qmath-checker-owner", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _init_worker(owner_pid: int | None = None) -> None:
    """Quiet, warm worker bound to its owner (:func:`_bind_to_owner`): math-verify logs
    every timeout ("Timeout during comparison") and sympy warns; the evaluation's stdout
    must carry none of it."""
    if owner_pid is not None:
        _bind_to_owner(owner_pid)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker
    warnings.simplefilter("ignore")
    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    # The first parse builds math-verify's regexes and the LaTeX parser: do it before any
    # timed task so that it is not charged to a check.
    check_equivalence("\\frac{1}{2}", "0.5")


def _run_check(check_fn: CheckFn, reference: str, prediction: str, convention: Convention) -> str:
    """Worker side of one check: a status word, so that exceptions inside the check are
    told apart from pool-level timeouts and crashes."""
    try:
        outcome = check_fn(reference, prediction, convention)
    except Exception:  # any failure of the check itself is an "error", never a crash
        return "error"
    if isinstance(outcome, Verdict):
        if outcome.equal:
            return "equal"
        return "timeout" if outcome.timed_out else "different"
    return "equal" if outcome else "different"


def _default_check(
    reference: str, prediction: str, convention: Convention, *, math_verify_timeout: int
) -> Verdict:
    return check_equivalence(
        reference, prediction, convention, math_verify_timeout=math_verify_timeout
    )


class AnswerChecker:
    """Checks (reference, prediction) pairs in ``workers`` processes, each check with a hard
    ``timeout_s`` wall-clock limit.

    ``math_verify_timeout`` (whole seconds) is passed to math-verify so that its own
    timeouts usually fire first (the worker then survives); default ``timeout_s // 3``.
    ``check_fn`` replaces the default check (a module-level function, as workers receive
    it by pickling; tests inject hangs and crashes with it). Results are cached per
    (reference, prediction) for the checker's lifetime (up to ``cache_size`` pairs).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 10.0,
        convention: Convention = _DEFAULT_CONVENTION,
        *,
        check_fn: CheckFn | None = None,
        math_verify_timeout: int | None = None,
        cache_size: int = 200_000,
        max_tasks_per_worker: int = 5_000,
        mp_context: str = _MP_CONTEXT,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.convention = convention
        if math_verify_timeout is None:
            math_verify_timeout = max(1, int(timeout_s // 3))
        self.math_verify_timeout = int(math_verify_timeout)
        self._check_fn: CheckFn = check_fn or functools.partial(
            _default_check, math_verify_timeout=self.math_verify_timeout
        )
        self._cache: OrderedDict[tuple[str, str], CheckResult] = OrderedDict()
        self._cache_size = cache_size
        self._max_tasks = max_tasks_per_worker
        if mp_context not in multiprocessing.get_all_start_methods():
            raise ValueError(f"unknown multiprocessing start method {mp_context!r}")
        self.mp_context = mp_context
        self._lock = threading.Lock()
        self._pool: Any = None
        self._finalizer: weakref.finalize | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("checks", "tasks", "timeouts", "killed", "crashes", "errors", "cache_hits", "empty"),
            0,
        )

    # -- pool ------------------------------------------------------------------------

    def _ensure_pool(self) -> Any:
        if self._pool is not None and self._pool.active:
            return self._pool
        from pebble import ProcessPool

        context = multiprocessing.get_context(self.mp_context)
        if self.mp_context == "forkserver":
            # Only takes effect when this process has not started its fork server yet.
            context.set_forkserver_preload(_PRELOAD)
        self._pool = ProcessPool(
            max_workers=self.workers,
            max_tasks=self._max_tasks,
            initializer=_init_worker,
            initargs=(os.getpid(),),
            context=context,
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop_pool, self._pool)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (idempotent; the checker can be used again)."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._pool = None

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checking --------------------------------------------------------------------

    def equivalent(self, reference: str, prediction: str | None) -> CheckResult:
        """Check one pair (see :meth:`equivalent_many`)."""
        return self.equivalent_many([(reference, prediction)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[CheckResult]:
        """Check (reference, prediction) pairs; results in input order.

        Each distinct pair is one pool task with the hard timeout; repeated pairs and
        pairs seen before are answered from the cache. A None or blank prediction is
        "no answer": ``CheckResult(False, "ok")`` without a task.
        """
        results: list[CheckResult | None] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            self.stats["checks"] += len(pairs)
            for i, (reference, prediction) in enumerate(pairs):
                if prediction is None or not str(prediction).strip():
                    results[i] = CheckResult(False, "ok")
                    self.stats["empty"] += 1
                    continue
                key = (str(reference), str(prediction))
                cached = self._cache.get(key)
                if cached is not None:
                    self._cache.move_to_end(key)
                    results[i] = cached
                    self.stats["cache_hits"] += 1
                elif key in todo:
                    todo[key].append(i)
                    self.stats["cache_hits"] += 1
                else:
                    todo[key] = [i]
        if todo:
            for key, result in self._run_tasks(list(todo)).items():
                for i in todo[key]:
                    results[i] = result
        return [r if r is not None else CheckResult(False, "error") for r in results]

    def _run_tasks(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], CheckResult]:
        pool = self._ensure_pool()
        futures = {}
        out: dict[tuple[str, str], CheckResult] = {}
        for key in keys:
            try:
                futures[key] = pool.schedule(
                    _run_check,
                    args=(self._check_fn, *key, self.convention),
                    timeout=self.timeout_s,
                )
            except Exception:  # unpicklable check_fn or a pool that stopped: not a hang
                out[key] = self._record(key, "error")
        # Belt and braces: pebble enforces timeout_s per task once it runs; this bound on
        # the whole batch (queueing included) only matters if the pool itself breaks.
        waves = math.ceil(len(futures) / self.workers) + 2
        deadline = time.monotonic() + waves * (self.timeout_s + 30.0)
        for key, future in futures.items():
            try:
                word = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                # Done: pebble killed the worker at timeout_s. Not done: the batch deadline.
                killed = future.done()
                future.cancel()
                out[key] = self._record(key, "timeout", killed=killed)
                continue
            except concurrent.futures.CancelledError:
                out[key] = self._record(key, "error")
                continue
            except Exception as exc:
                out[key] = self._record(key, _failure_status(exc))
                continue
            if word == "equal":
                out[key] = self._record(key, "ok", equal=True)
            elif word == "different":
                out[key] = self._record(key, "ok")
            else:
                out[key] = self._record(key, word)
        return out

    def _record(
        self, key: tuple[str, str], status: str, equal: bool = False, killed: bool = False
    ) -> CheckResult:
        result = CheckResult(equal, status)
        with self._lock:
            self.stats["tasks"] += 1
            self.stats["killed"] += int(killed)
            counter = {"timeout": "timeouts", "crash": "crashes", "error": "errors"}.get(status)
            if counter:
                self.stats[counter] += 1
            # Timeouts are cached too: the same pair would only burn timeout_s again.
            if status in ("ok", "timeout"):
                self._cache[key] = result
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result

    def score_completions(
        self, reference: str, completions: Sequence[str]
    ) -> list[tuple[str | None, CheckResult]]:
        """(extracted answer, result) for each completion of one problem."""
        answers = [extract_answer(c) for c in completions]
        results = self.equivalent_many([(reference, a) for a in answers])
        return list(zip(answers, results, strict=True))


def _failure_status(exc: BaseException) -> str:
    from pebble import ProcessExpired

    return "crash" if isinstance(exc, ProcessExpired) else "error"


def _stop_pool(pool: Any) -> None:
    pool.stop()
    pool.join(timeout=10)

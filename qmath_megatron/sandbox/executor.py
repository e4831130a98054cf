"""The sandboxed executor: a bounded pool of slots, one untrusted program per call.

Each slot owns an unprivileged uid (when we are root) for the executor's lifetime. A call:
makes a fresh call directory, writes the code there as ``main.py``, launches the command from
:func:`~qmath_megatron.sandbox.isolation.build_command` with a scrubbed environment, reads
stdout and stderr concurrently (truncating, and killing on a flood), enforces the wall-clock
limit, then kills every leftover process of the slot's uid, waits for the uid to own nothing
(zombies included), and deletes the call directory (and, on the weak backend, whatever the
uid left in the shared temp directories).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from qmath_megatron.sandbox.config import SandboxConfig
from qmath_megatron.sandbox.isolation import (
    CHAIN_PROCESSES,
    SIGNAL_EXIT_BASE,
    IsolationReport,
    Limits,
    Plan,
    SandboxUnavailable,
    build_command,
    detect,
    sandbox_env,
)
from qmath_megatron.sandbox.procs import (
    count_tasks_of_uid,
    cwd_of,
    kill_matching,
    kill_uid,
    path_inside,
    wait_uid_clean,
)
from qmath_megatron.sandbox.uids import UidExhausted, UidLease, lease_uids
from qmath_megatron.sandbox.workspace import Workspace, force_rmtree

log = logging.getLogger(__name__)

# Where an unprivileged uid can write outside its call directory on a typical Linux host; the
# weak backend (no private filesystem view) removes what the slot uid left there.
SHARED_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
FLOOD_FACTOR = 16  # kill once a call has written this many times max_output_bytes
_EXIT_GRACE_S = 0.1  # after the program exits, how long descendants may still hold the pipes
_DRAIN_S = 1.0  # after the kill, how long to collect what is left in the pipes
_REAP_S = 5.0
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")


@dataclass
class ExecResult:
    # "ok" | "error" (nonzero exit) | "timeout" | "memory" | "output_limit" | "killed" (signal)
    status: str
    stdout: str
    stderr: str
    seconds: float
    returncode: int | None  # negative: killed by that signal
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    isolation: str = ""  # backend used
    uid: int | None = None  # the slot uid the program ran under (None: no uid isolation)
    workdir: str = ""  # the call directory (deleted when the call returns)

    def to_dict(self) -> dict:
        return asdict(self)


class _Stream:
    """Keeps the first ``keep`` bytes of a stream and counts the rest."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.keep - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > self.keep

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Capture:
    """Reads both pipes through one selector, so a full pipe never blocks the program."""

    def __init__(self, proc: subprocess.Popen, keep: int) -> None:
        self.proc = proc
        self.out = _Stream(keep)
        self.err = _Stream(keep)
        self.sel = selectors.DefaultSelector()
        for pipe, stream in ((proc.stdout, self.out), (proc.stderr, self.err)):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            self.sel.register(pipe, selectors.EVENT_READ, stream)

    @property
    def total(self) -> int:
        return self.out.total + self.err.total

    def _read_ready(self, wait: float) -> None:
        for key, _ in self.sel.select(max(wait, 0.0)):
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if chunk:
                key.data.add(chunk)
            else:
                self.sel.unregister(key.fileobj)

    def pump(self, deadline: float, flood_at: int) -> str | None:
        """Read until the program ends (None), the deadline passes or the output floods."""
        exited_at = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if self.proc.poll() is not None:
                exited_at = exited_at or now
                if not self.sel.get_map() or now - exited_at >= _EXIT_GRACE_S:
                    return None
            if not self.sel.get_map():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=min(deadline - now, 0.05))
                continue
            self._read_ready(min(deadline - now, 0.05))
            if self.total > flood_at:
                return "output_limit"

    def drain(self, seconds: float) -> None:
        """Collect what the (now dead) processes left in the pipes."""
        deadline = time.monotonic() + seconds
        while self.sel.get_map() and time.monotonic() < deadline:
            self._read_ready(deadline - time.monotonic())

    def close(self) -> None:
        self.sel.close()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def normalize_returncode(returncode: int | None, plan: Plan) -> int | None:
    """Negative signal numbers for programs killed by a signal, whatever launched them.

    Under bwrap or a pid-1 shell the program's parent reports a fatal signal as exit code
    128+sig; those codes are mapped back (so a program that itself exits with 137 is
    reported as killed by SIGKILL: the two cannot be told apart from outside).
    """
    if returncode is None or not plan.signal_as_exit_code:
        return returncode
    if SIGNAL_EXIT_BASE < returncode <= SIGNAL_EXIT_BASE + 64:
        return -(returncode - SIGNAL_EXIT_BASE)
    return returncode


def classify(reason: str | None, returncode: int | None, stderr: str) -> str:
    if reason in ("timeout", "output_limit"):
        return reason
    if returncode == 0:
        return "ok"
    if any(marker in stderr for marker in _MEMORY_MARKERS):
        return "memory"
    if returncode is not None and returncode < 0:
        return "killed"
    return "error"


def sweep_files_of_uid(
    uid: int, dirs: tuple[str, ...] = SHARED_WRITABLE_DIRS, depth: int = 1
) -> list[str]:
    """Remove what ``uid`` owns in the shared writable dirs (and their world-writable subdirs)."""
    removed: list[str] = []
    for directory in dirs:
        for entry in _scandir(directory):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                _remove(entry.path, stat.S_ISDIR(st.st_mode))
                removed.append(entry.path)
            elif depth > 0 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
                removed += sweep_files_of_uid(uid, (entry.path,), depth - 1)
    return removed


def _scandir(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:
        return []


def _remove(path: str, is_dir: bool) -> None:
    with contextlib.suppress(OSError):
        if is_dir:
            force_rmtree(path)
        else:
            os.unlink(path)


class _Slot:
    def __init__(self, lease: UidLease | None) -> None:
        self.lease = lease

    @property
    def uid(self) -> int | None:
        return self.lease.uid if self.lease is not None else None


class SandboxExecutor:
    """Runs untrusted Python programs in parallel, each isolated at the OS level.

    ``run`` is thread-safe; at most ``config.workers`` programs run at once (one per slot).
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        detection = detect(self.config)
        self._plan = detection.plan
        report = detection.report
        self.isolation = report.copy()
        if self.config.require_strong and not self.isolation.strong:
            raise SandboxUnavailable(
                "require_strong=True but only weak isolation is available: "
                + "; ".join(self.isolation.warnings)
            )
        if not self.isolation.strong:
            _warn_loudly(self.isolation)
        self._workspace = Workspace(self.config.workdir_root, self._plan.stage_slots)
        self._stages = [self._workspace.stage_dir(i) for i in range(self._plan.stage_slots)]
        self._slots: queue.Queue[_Slot] = queue.Queue()
        self._all_slots = [_Slot(lease) for lease in self._lease_slots()]
        for slot in self._all_slots:
            self._slots.put(slot)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _lease_slots(self) -> list[UidLease | None]:
        if not self._plan.uid_drop:
            return [None] * self.config.workers
        try:
            leases = lease_uids(self.config.workers, self.config.uid_first, self.config.uid_count)
        except UidExhausted as exc:
            self._workspace.close()
            raise SandboxUnavailable(str(exc)) from exc
        for lease in leases:  # leftovers of a crashed previous holder of this uid
            kill_uid(lease.uid)
            wait_uid_clean(lease.uid, _REAP_S)
            sweep_files_of_uid(lease.uid)
        return list(leases)

    # --- public API ----------------------------------------------------------------------

    def run(self, code: str) -> ExecResult:
        """Run one program; blocks until a slot is free and the program has ended."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        slot = self._acquire_slot()
        try:
            return self._run_in_slot(slot, code)
        finally:
            self._slots.put(slot)

    def _acquire_slot(self) -> _Slot:
        # Polls so that a call waiting for a slot notices close() instead of blocking forever.
        while True:
            if self._closed:
                raise RuntimeError("SandboxExecutor is closed")
            try:
                slot = self._slots.get(timeout=0.5)
            except queue.Empty:
                continue
            if not self._closed:
                return slot
            self._slots.put(slot)

    def run_many(self, codes: list[str]) -> list[ExecResult]:
        """Run programs on the bounded pool; results come back in input order."""
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxExecutor is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.workers, "qmath-sandbox")
            pool = self._pool
        return list(pool.map(self.run, codes))

    def close(self, timeout: float | None = None) -> None:
        """Wait for calls in flight, release the uids and delete the workspace.

        With ``timeout``, stop waiting after that many seconds: the uid of a call that is
        still running stays leased (the kernel frees it when this process exits).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=timeout is None, cancel_futures=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        idle: list[_Slot] = []
        for _ in self._all_slots:  # every slot back means no call is in flight
            wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                idle.append(self._slots.get(timeout=wait))
            except queue.Empty:
                log.warning("closing the sandbox with calls still running")
                break
        for slot in idle:
            if slot.lease is not None:
                slot.lease.release()
        self._workspace.close()

    def __enter__(self) -> SandboxExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- one call ------------------------------------------------------------------------

    def _limits(self, uid: int | None) -> Limits:
        nproc = self.config.max_processes + CHAIN_PROCESSES
        if uid is None and os.geteuid() != 0:
            # RLIMIT_NPROC counts every task of our real uid: allow what already exists.
            nproc += count_tasks_of_uid(os.getuid())
        return Limits.from_config(self.config, nproc)

    def _run_in_slot(self, slot: _Slot, code: str) -> ExecResult:
        uid = slot.uid
        workdir = self._workspace.new_call_dir(uid)
        try:
            self._workspace.write_program(workdir, code, uid)
            cmd = build_command(
                self._plan, self.config.python, workdir, uid, self._limits(uid), self._stages
            )
            reason, returncode, out, err, seconds = self._launch(cmd, workdir, uid)
        finally:
            force_rmtree(workdir)
            if uid is not None and not self.isolation.filesystem_isolated:
                sweep_files_of_uid(uid)
        returncode = normalize_returncode(returncode, self._plan)
        return ExecResult(
            status=classify(reason, returncode, err.text()),
            stdout=out.text(),
            stderr=err.text(),
            seconds=round(seconds, 4),
            returncode=returncode,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            isolation=self.isolation.backend,
            uid=uid,
            workdir=workdir,
        )

    def _launch(
        self, cmd: list[str], workdir: str, uid: int | None
    ) -> tuple[str | None, int | None, _Stream, _Stream, float]:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=sandbox_env(workdir),
            start_new_session=True,
        )
        capture = _Capture(proc, self.config.max_output_bytes)
        try:
            flood_at = FLOOD_FACTOR * self.config.max_output_bytes
            reason = capture.pump(start + self.config.timeout_s, flood_at)
            seconds = time.monotonic() - start
            self._terminate(proc, uid, workdir)
            capture.drain(_DRAIN_S)
        finally:
            if proc.poll() is None:  # only on an exception above
                self._terminate(proc, uid, workdir)
            capture.close()
        return reason, proc.returncode, capture.out, capture.err, seconds

    def _terminate(self, proc: subprocess.Popen, uid: int | None, workdir: str) -> None:
        """Kill the call's whole process tree, however it tried to detach, and reap it."""
        if uid is not None:
            # Everything of the call runs under `uid`, also what left the session. The pid
            # namespace's init (the child of `unshare`, our child) is spared at first: once its
            # program is dead it exits by itself with 128+signal, the kernel tears down the
            # namespace and `unshare` reaps it. Killing the init directly would make `unshare`
            # print an error into the program's stderr; killing `unshare` first would orphan
            # a zombie of `uid`.
            kill_matching(lambda p: uid in p.uids[:3] and p.ppid != proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            kill_uid(uid)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            kill_matching(lambda p: path_inside(cwd_of(p.pid), workdir))
        try:
            proc.wait(timeout=_REAP_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
        if uid is not None and not wait_uid_clean(uid, _REAP_S):
            log.warning("sandbox uid %d still owns processes after the call", uid)


def _warn_loudly(report: IsolationReport) -> None:
    message = (
        f"qmath sandbox: WEAK isolation ({report.backend} backend) for untrusted code: "
        + "; ".join(report.warnings)
    )
    log.warning(message)
    print(f"WARNING: {message}", file=sys.stderr)

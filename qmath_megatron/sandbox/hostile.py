"""A corpus of hostile programs and the harness that checks the sandbox against them.

Shipped in the package so that isolation can be checked where it matters, on the cluster
that runs the evaluation: ``qmath exec --self-test``. Each program attacks one boundary
(limits, processes, files, network, secrets, privileges) and has a check, made on the *host*
after the call, of whether it got through. Paths and tokens carry a fresh nonce per run, so
reruns never see each other's leftovers; the harness removes whatever strays it finds.

Each program also names the isolation claim that must stop it (``guaranteed``): the weak
backend does not promise a private filesystem, so a file it leaves behind counts as an
escape, but tests of the weak backend only insist on the claims its report makes.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from qmath_megatron.sandbox.config import SandboxConfig
from qmath_megatron.sandbox.executor import ExecResult, SandboxExecutor
from qmath_megatron.sandbox.isolation import IsolationReport
from qmath_megatron.sandbox.procs import (
    ProcInfo,
    cmdline_of,
    cwd_of,
    iter_processes,
    kill_matching,
    path_inside,
)

HANG_GRACE_S = 5.0  # a call that has not returned by timeout + this is a hang
SECRET_NAME = "QMATH_SECRET_TOKEN"
DAEMON_DELAY_S = 1.5  # the detached daemon acts this long after its call returned
_PROCESS_COUNT_SLACK = 256  # other users' processes come and go on a shared host

SELF_TEST_CONFIG = SandboxConfig(
    timeout_s=3.0, memory_mb=512, max_processes=16, max_output_bytes=4096, max_file_mb=8
)


@dataclass
class HarnessContext:
    config: SandboxConfig
    report: IsolationReport
    project_dir: str
    host_home: str
    finished_at: float = 0.0  # time.monotonic() when every call had returned
    host_processes_before: int = 0


def _survivor_matcher(result: ExecResult, markers: tuple[str, ...]) -> Callable[[ProcInfo], bool]:
    def match(p: ProcInfo) -> bool:
        if result.uid is not None and result.uid in p.uids[:3]:
            return True
        if path_inside(cwd_of(p.pid), result.workdir):
            return True
        return bool(markers) and any(m in cmdline_of(p.pid) for m in markers)

    return match


def find_survivors(
    result: ExecResult, markers: tuple[str, ...] = (), wait_s: float = 1.0
) -> list[int]:
    """Live processes of the call still around after ``wait_s`` (uid, cwd or nonce match)."""
    match = _survivor_matcher(result, markers)
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p.pid for p in iter_processes() if not p.zombie and match(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def host_process_count() -> int:
    return sum(1 for p in iter_processes() if not p.zombie)


class HostileProgram(abc.ABC):
    """One attack: its source, the claim that must stop it, and the host-side check."""

    name = ""
    guarantee = "always"  # limits | processes | files | network | secrets | privileges

    def __init__(self, ctx: HarnessContext) -> None:
        self.ctx = ctx
        self.nonce = secrets.token_hex(8)

    def setup(self) -> None:  # noqa: B027 - optional hook, most programs need no bait
        """Prepare host-side bait (listeners, decoys) before the run."""

    @abc.abstractmethod
    def code(self) -> str:
        """The program text."""

    @abc.abstractmethod
    def check(self, result: ExecResult) -> tuple[bool, str]:
        """(escaped, detail), decided on the host after the call."""

    def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Remove what the program may have left on the host, and the bait."""

    def guaranteed(self, report: IsolationReport) -> bool:
        return guarantee_holds(self.guarantee, report)

    def too_dangerous(self, report: IsolationReport) -> str | None:
        """Why running this program could hurt the host under ``report`` (None: safe)."""
        return None


def guarantee_holds(guarantee: str, report: IsolationReport) -> bool:
    """Whether the isolation in ``report`` claims to stop attacks of this kind."""
    confined = report.uid_isolated or report.pid_namespace
    return {
        "always": True,
        "processes": confined,
        "files": report.filesystem_isolated or report.uid_isolated,
        "network": report.network_isolated,
        "secrets": confined,
        "privileges": report.uid_isolated or os.geteuid() != 0,
    }[guarantee]


class _EscapePaths(HostileProgram):
    """Base for programs that try to create files on the host: nonce paths to look for."""

    def escape_paths(self) -> list[str]:
        dirs = ["/tmp", "/var/tmp", "/dev/shm", self.ctx.project_dir, self.ctx.host_home]
        unique = dict.fromkeys(os.path.realpath(d) for d in dirs if os.path.isdir(d))
        return [os.path.join(d, f"qmath_escape_{self.nonce}_{self.name}") for d in unique]

    def leaked(self) -> list[str]:
        return [p for p in self.escape_paths() if os.path.lexists(p)]

    def cleanup(self) -> None:
        for path in self.leaked():
            with contextlib.suppress(OSError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)


class InfiniteLoop(HostileProgram):
    name = "infinite_loop"

    def code(self) -> str:
        return "while True:\n    pass\n"

    def check(self, result: ExecResult) -> tuple[bool, str]:
        return result.status not in ("timeout", "killed"), f"ended as {result.status}"


class SignalIgnorer(HostileProgram):
    name = "signal_ignore"

    def code(self) -> str:
        return (
            "import signal\n"
            "for s in ('SIGTERM', 'SIGINT', 'SIGHUP', 'SIGXCPU', 'SIGXFSZ', 'SIGALRM'):\n"
            "    signal.signal(getattr(signal, s), signal.SIG_IGN)\n"
            "while True:\n    pass\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        return result.status not in ("timeout", "killed"), f"ended as {result.status}"


class DeepRecursion(HostileProgram):
    name = "deep_recursion"

    def code(self) -> str:
        return (
            "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        return result.status == "ok", f"ended as {result.status} (returncode {result.returncode})"


class MemoryBomb(HostileProgram):
    name = "memory_bomb"

    def code(self) -> str:
        # 100 MB blocks: bytes() of zeros is only reserved, so RLIMIT_AS is hit at once.
        return (
            "blocks = []\n"
            "try:\n"
            "    while True:\n"
            "        blocks.append(bytes(100 * 2**20))\n"
            "except MemoryError:\n"
            "    print('allocated_mb', 100 * len(blocks), flush=True)\n"
            "    raise\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        got = [int(w) for line in result.stdout.splitlines() for w in line.split()[1:2]]
        over = bool(got) and got[0] > self.ctx.config.memory_mb
        escaped = over or result.status not in ("memory", "killed")
        return escaped, f"ended as {result.status}; allocated_mb={got[0] if got else '?'}"


class OutputFlood(HostileProgram):
    name = "output_flood"

    def code(self) -> str:
        return "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"

    def check(self, result: ExecResult) -> tuple[bool, str]:
        kept = len(result.stdout.encode())
        escaped = kept > self.ctx.config.max_output_bytes or result.status not in (
            "output_limit",
            "timeout",
        )
        return escaped, f"ended as {result.status}; kept {kept} bytes"


class ForkBomb(HostileProgram):
    name = "fork_bomb"
    guarantee = "processes"

    def code(self) -> str:
        return (
            "import os\n"
            "while True:\n"
            "    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n"
        )

    def too_dangerous(self, report: IsolationReport) -> str | None:
        if os.geteuid() == 0 and not report.uid_isolated:
            return "not run: as root without a per-call uid there is no process limit"
        return None

    def check(self, result: ExecResult) -> tuple[bool, str]:
        survivors = find_survivors(result)
        now = host_process_count()
        grew = now > self.ctx.host_processes_before + _PROCESS_COUNT_SLACK
        detail = (
            f"ended as {result.status}; survivors={len(survivors)}; host processes "
            f"{self.ctx.host_processes_before} -> {now}"
        )
        if survivors:
            kill_matching(lambda p: p.pid in set(survivors))
        return bool(survivors) or grew, detail


class DetachedDaemon(_EscapePaths):
    name = "detached_daemon"
    guarantee = "processes"

    def code(self) -> str:
        marker = self.escape_paths()[0]
        daemon = (
            f"import time; time.sleep({DAEMON_DELAY_S}); "
            f"open({marker!r}, 'w').write('daemon survived {self.nonce}')"
        )
        return (
            "import os, sys\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        os.chdir('/')\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', {daemon!r}])\n"
            "    os._exit(0)\n"
            "print('parent done')\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        # Give a surviving daemon the time to act before looking for its marker.
        remaining = self.ctx.finished_at + DAEMON_DELAY_S + 1.0 - time.monotonic()
        time.sleep(max(remaining, 0.0))
        survivors = find_survivors(result, (self.nonce,))
        if survivors:
            kill_matching(lambda p: p.pid in set(survivors))
        leaked = self.leaked()
        escaped = bool(survivors or leaked)
        return escaped, f"ended as {result.status}; survivors={survivors}; marker={leaked}"


class WriteOutside(_EscapePaths):
    name = "write_outside"
    guarantee = "files"

    def code(self) -> str:
        return (
            "ok = []\n"
            f"for path in {self.escape_paths()!r}:\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n            f.write('escaped')\n"
            "        ok.append(path)\n"
            "    except OSError as exc:\n        print('denied', path, exc.strerror)\n"
            "print('written inside the sandbox:', ok)\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        leaked = self.leaked()
        inside = result.stdout.strip().splitlines()[-1:] or ["(no output)"]
        return bool(leaked), f"{inside[0]}; visible on the host afterwards: {leaked}"


class ShellEscape(_EscapePaths):
    name = "shell_escape"
    guarantee = "files"

    def code(self) -> str:
        paths = self.escape_paths()
        touch = f"touch {shlex.quote(paths[0])} 2>/dev/null"
        echo = f"echo x > {shlex.quote(paths[1 % len(paths)])}"
        writer = f"open({paths[-1]!r}, 'w')"
        return (
            "import os, subprocess\n"
            f"os.system({touch!r})\n"
            f"subprocess.run(['sh', '-c', {echo!r}], stderr=subprocess.DEVNULL)\n"
            f"subprocess.run(['python3', '-c', {writer!r}], stderr=subprocess.DEVNULL)\n"
            "print('shell commands ran')\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        leaked = self.leaked()
        return bool(leaked), f"ran={'shell commands ran' in result.stdout}; visible: {leaked}"


class CtypesSyscall(_EscapePaths):
    name = "ctypes_system"
    guarantee = "files"

    def code(self) -> str:
        command = " ; ".join(f"touch {shlex.quote(p)}" for p in self.escape_paths())
        return (
            "import ctypes\n"
            "libc = ctypes.CDLL(None)\n"
            f"libc.system({(command + ' 2>/dev/null; echo ctypes-ran').encode()!r})\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        leaked = self.leaked()
        ran = "ctypes-ran" in result.stdout
        note = "libc system() ran, bypassing any Python hook" if ran else "system() did not run"
        return bool(leaked), f"{note}; visible on the host: {leaked}"


class _Listener(HostileProgram):
    """Owns a listening socket on the host's loopback: any accepted connection is an escape."""

    guarantee = "network"

    def setup(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        count = 0
        while select.select([self.sock], [], [], 0)[0]:
            conn, _ = self.sock.accept()
            conn.close()
            count += 1
        return count

    def check(self, result: ExecResult) -> tuple[bool, str]:
        accepted = self.connections()
        return accepted > 0, f"host listener accepted {accepted} connection(s)"

    def cleanup(self) -> None:
        self.sock.close()


class SocketConnect(_Listener):
    name = "socket_connect"

    def code(self) -> str:
        return (
            "import socket\n"
            "for host in ('127.0.0.1', 'localhost'):\n"
            "    try:\n"
            f"        socket.create_connection((host, {self.port}), timeout=1).close()\n"
            "        print('connected', host)\n"
            "    except OSError as exc:\n        print('refused', host, exc)\n"
        )


class SubprocessNetwork(_Listener):
    name = "subprocess_network"

    def code(self) -> str:
        probe = f"import socket; socket.create_connection(('127.0.0.1', {self.port}), 1)"
        return (
            "import shutil, subprocess\n"
            "if shutil.which('curl'):\n"
            f"    subprocess.run(['curl', '-s', '-m', '1', 'http://127.0.0.1:{self.port}/'])\n"
            f"subprocess.run(['python3', '-c', {probe!r}], stderr=subprocess.DEVNULL)\n"
        )


class EnvSecrets(HostileProgram):
    name = "env_secrets"
    guarantee = "secrets"

    def setup(self) -> None:
        # The secret sits in this process's environment and in the initial environment of a
        # decoy process (what /proc/PID/environ shows).
        self.token = secrets.token_hex(16)
        self.previous = os.environ.get(SECRET_NAME)
        os.environ[SECRET_NAME] = self.token
        self.decoy = subprocess.Popen(
            ["sleep", "300"], env={"PATH": "/usr/bin:/bin", SECRET_NAME: self.token}
        )

    def code(self) -> str:
        return (
            "import os\n"
            "print(dict(os.environ))\n"
            "pids = ['1', str(os.getppid())] + [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "for pid in pids:\n"
            "    try:\n"
            "        with open(f'/proc/{pid}/environ', 'rb') as f:\n"
            "            print(pid, f.read().replace(b'\\0', b' ').decode(errors='replace'))\n"
            "    except OSError:\n        pass\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        seen = self.token in result.stdout or self.token in result.stderr
        return seen, "secret seen by the program" if seen else "secret not visible"

    def cleanup(self) -> None:
        self.decoy.kill()
        self.decoy.wait()
        if self.previous is None:
            os.environ.pop(SECRET_NAME, None)
        else:
            os.environ[SECRET_NAME] = self.previous


class ReadPrivileged(HostileProgram):
    name = "read_privileged"
    guarantee = "privileges"

    def code(self) -> str:
        return (
            "import os\n"
            "try:\n"
            "    data = open('/etc/shadow').read()\n"
            "    print('SHADOW-READ', len(data))\n"
            "except OSError as exc:\n    print('denied', exc.strerror)\n"
        )

    def check(self, result: ExecResult) -> tuple[bool, str]:
        read = "SHADOW-READ" in result.stdout
        return read, "read /etc/shadow" if read else "/etc/shadow not readable"


CORPUS: tuple[type[HostileProgram], ...] = (
    InfiniteLoop,
    ForkBomb,
    MemoryBomb,
    OutputFlood,
    ShellEscape,
    SocketConnect,
    SubprocessNetwork,
    WriteOutside,
    EnvSecrets,
    SignalIgnorer,
    DeepRecursion,
    DetachedDaemon,
    CtypesSyscall,
    ReadPrivileged,
)


@dataclass
class _Outcome:
    program: HostileProgram
    result: ExecResult | None = None
    seconds: float = 0.0
    skipped: str | None = None
    entry: dict = field(default_factory=dict)


def _timed_run(executor: SandboxExecutor, code: str) -> tuple[ExecResult, float]:
    start = time.monotonic()
    result = executor.run(code)
    return result, time.monotonic() - start


def _run_all(executor: SandboxExecutor, outcomes: list[_Outcome]) -> None:
    """Run the programs in parallel, giving up on calls that never return (hangs)."""
    runnable = [o for o in outcomes if o.skipped is None]
    config = executor.config
    rounds = math.ceil(len(runnable) / config.workers)
    budget = rounds * (config.timeout_s + HANG_GRACE_S) + 30.0
    pool = ThreadPoolExecutor(config.workers, "qmath-hostile")
    futures = {pool.submit(_timed_run, executor, o.program.code()): o for o in runnable}
    wait(futures, timeout=budget)
    for future, outcome in futures.items():
        if future.done():
            outcome.result, outcome.seconds = future.result()
        else:
            outcome.seconds = budget
    pool.shutdown(wait=False, cancel_futures=True)


def _judge(outcome: _Outcome, ctx: HarnessContext) -> dict:
    program, result = outcome.program, outcome.result
    entry = {"name": program.name, "guaranteed": program.guaranteed(ctx.report)}
    if outcome.skipped is not None:
        return {
            **entry,
            "status": "not_run",
            "seconds": 0.0,
            "escaped": True,
            "hang": False,
            "detail": outcome.skipped,
        }
    if result is None:
        return {
            **entry,
            "status": "hang",
            "seconds": round(outcome.seconds, 3),
            "escaped": False,
            "hang": True,
            "detail": "the call never returned",
        }
    escaped, detail = program.check(result)
    return {
        **entry,
        "status": result.status,
        "seconds": round(outcome.seconds, 3),
        "escaped": escaped,
        "hang": outcome.seconds > ctx.config.timeout_s + HANG_GRACE_S,
        "detail": detail,
    }


def _context(executor: SandboxExecutor) -> HarnessContext:
    return HarnessContext(
        config=executor.config,
        report=executor.isolation,
        # The checkout (or site-packages) holding the qmath_megatron package.
        project_dir=str(Path(__file__).resolve().parents[2]),
        host_home=os.path.expanduser("~"),
    )


def run_hostile_corpus(executor: SandboxExecutor) -> dict:
    """Run every hostile program through ``executor``; the report says what got through."""
    ctx = _context(executor)
    outcomes = [_Outcome(cls(ctx)) for cls in CORPUS]
    for outcome in outcomes:
        outcome.skipped = outcome.program.too_dangerous(ctx.report)
    ready: list[HostileProgram] = []
    entries: list[dict] = []
    try:
        for outcome in outcomes:
            outcome.program.setup()
            ready.append(outcome.program)
        ctx.host_processes_before = host_process_count()
        _run_all(executor, outcomes)
        ctx.finished_at = time.monotonic()
        entries = [_judge(outcome, ctx) for outcome in outcomes]
    finally:
        for program in ready:
            program.cleanup()
    return {
        "isolation": executor.isolation.to_dict(),
        "attempts": len(entries),
        "escapes": sum(e["escaped"] for e in entries),
        "hangs": sum(e["hang"] for e in entries),
        "programs": entries,
    }


def self_test(config: SandboxConfig | None = None) -> dict:
    """Build an executor from ``config`` (default: short limits) and run the corpus."""
    executor = SandboxExecutor(config or SELF_TEST_CONFIG)
    try:
        return run_hostile_corpus(executor)
    finally:
        # Bounded, so that a call that really hangs cannot hang the self-test as well.
        executor.close(timeout=executor.config.timeout_s + HANG_GRACE_S)

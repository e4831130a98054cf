"""Which isolation this host offers, verified by probing, and the command line for one call.

Two backends, strongest first:

* ``bwrap`` (strong): bubblewrap gives the program a read-only view of the host filesystem,
  private ``/tmp``, ``/var/tmp`` and ``/dev/shm``, and its own user, pid, network, ipc and
  uts namespaces. When we are root the command first drops to the slot's unprivileged uid, so
  bwrap runs unprivileged and RLIMIT_NPROC holds.
* ``rlimits`` (weak): the same uid drop, rlimits, scrubbed environment and fresh working
  directory, plus (root only, when ``unshare`` works) a private network and pid namespace;
  the program sees and can write the host filesystem wherever its uid may.

Every candidate is run once with a probe program before it is trusted: a backend that does
not start, or whose claimed namespaces turn out not to be private, is skipped, and the
report says what was actually verified. Python-level guards are deliberately absent: code
can reach libc through ``ctypes``, so only the kernel's boundaries count.

As root, the command chain for one call is
``prlimit -> setpriv --pdeathsig -> unshare --pid --fork [--mount] [--net] -> [sh: expose
interpreter] -> setpriv --reuid U -> bwrap ... | timeout (pid-1 init) -> python -I -B main.py``.
``unshare --pid`` gives every call a pid namespace whose teardown kills and reaps all of its
processes even if bwrap's own init is killed first, so no zombie of the slot uid outlives
the call (pid 1 of a container may never reap it, and it would count against RLIMIT_NPROC).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import stat
import subprocess
import threading
import uuid
from dataclasses import asdict, dataclass, field

from qmath_megatron.sandbox.config import SandboxConfig
from qmath_megatron.sandbox.procs import kill_uid
from qmath_megatron.sandbox.uids import UidExhausted, UidLease, lease_uids
from qmath_megatron.sandbox.workspace import Workspace, force_rmtree

log = logging.getLogger(__name__)

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
# Exit codes 129..192 from a waiting parent (bwrap, the pid-1 shell) mean "killed by signal
# code-128"; such codes are reported as negative signal numbers, like subprocess does.
SIGNAL_EXIT_BASE = 128
_PROBE_TIMEOUT_S = 30.0
# Helper processes of the chain that run under the slot uid (bwrap outer + its init, or the
# pid-1 shell) and count against RLIMIT_NPROC on top of the program's own budget.
CHAIN_PROCESSES = 3


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this host."""


def sandbox_env(workdir: str) -> dict[str, str]:
    """The complete environment of the sandboxed program: nothing is inherited."""
    return {
        "PATH": SANDBOX_PATH,
        "HOME": workdir,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }


@dataclass
class IsolationReport:
    backend: str  # "bwrap" | "rlimits"
    strong: bool
    uid_isolated: bool  # runs under its own unprivileged uid
    network_isolated: bool
    filesystem_isolated: bool  # private, read-only view of the filesystem
    pid_namespace: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def copy(self) -> IsolationReport:
        """An independent copy (the detection cache keeps the original)."""
        return IsolationReport(**{**self.to_dict(), "warnings": list(self.warnings)})


@dataclass(frozen=True)
class Exposure:
    """Make interpreter directories reachable for the slot uid inside the call's mount ns.

    A root-owned Python under ``/root`` (mode 0700, e.g. pyenv) cannot be executed by an
    unprivileged uid. Inside a private mount namespace, ``mountpoint`` (the topmost ancestor
    that others may not search) is covered by an empty 0755 tmpfs and only ``paths`` are
    bound back, read-only: the interpreter keeps its real paths and the rest stays hidden.
    """

    mountpoint: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Tools:
    prlimit: str
    setpriv: str
    sh: str
    unshare: str | None
    timeout: str | None
    bwrap: str | None
    bwrap_disable_userns: bool

    @classmethod
    def find(cls) -> Tools:
        prlimit, setpriv, sh = (shutil.which(n) for n in ("prlimit", "setpriv", "sh"))
        if not (prlimit and setpriv and sh):
            raise SandboxUnavailable(
                "the sandbox needs util-linux's prlimit and setpriv and a POSIX sh on PATH"
            )
        bwrap = shutil.which("bwrap")
        unshare, timeout = shutil.which("unshare"), shutil.which("timeout")
        return cls(prlimit, setpriv, sh, unshare, timeout, bwrap, _bwrap_has(bwrap))


def _bwrap_has(bwrap: str | None, flag: str = "--disable-userns") -> bool:
    if bwrap is None:
        return False
    try:
        out = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in out.stdout + out.stderr


@dataclass(frozen=True)
class Plan:
    """How calls are launched: one verified candidate."""

    backend: str
    tools: Tools
    uid_drop: bool  # as root: run under the slot's unprivileged uid
    unshare: tuple[str, ...]  # flags for an outer `unshare` (empty: none)
    exposures: tuple[Exposure, ...] = ()
    # Interpreter directories under a directory that bwrap covers with a private tmpfs
    # (a venv in /tmp): bound back read-only, or the sandboxed Python would not start.
    rebinds: tuple[str, ...] = ()

    @property
    def pid_ns(self) -> bool:
        return self.backend == "bwrap" or "--pid" in self.unshare

    @property
    def signal_as_exit_code(self) -> bool:
        """The program's parent inside the chain turns a fatal signal into exit 128+sig."""
        return self.pid_ns

    @property
    def stage_slots(self) -> int:
        return sum(len(e.paths) for e in self.exposures)


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    cpu_soft_s: int
    file_bytes: int
    nproc: int
    tmpfs_bytes: int
    backstop_s: int  # wall clock of the in-sandbox `timeout`, only reached if we died

    @classmethod
    def from_config(cls, config: SandboxConfig, nproc: int) -> Limits:
        return cls(
            memory_bytes=config.memory_mb << 20,
            cpu_soft_s=config.cpu_limit_s,
            file_bytes=config.max_file_mb << 20,
            nproc=nproc,
            tmpfs_bytes=config.tmpfs_mb << 20,
            backstop_s=math.ceil(config.timeout_s) + 5,
        )


def _prlimit_args(tools: Tools, limits: Limits) -> list[str]:
    # The hard CPU limit one second later turns an ignored SIGXCPU into SIGKILL.
    return [
        tools.prlimit,
        f"--as={limits.memory_bytes}",
        f"--cpu={limits.cpu_soft_s}:{limits.cpu_soft_s + 1}",
        f"--fsize={limits.file_bytes}",
        f"--nproc={limits.nproc}",
        "--core=0",
        "--",
    ]


def expose_script(exposures: tuple[Exposure, ...], stage_dirs: list[str]) -> str:
    """sh code run as root in the call's private mount namespace before the uid drop."""
    q = shlex.quote
    lines = ["set -e"]
    staged: list[tuple[str, str]] = []
    for exposure in exposures:
        for path in exposure.paths:
            stage = stage_dirs[len(staged)]
            lines.append(f"mount --bind {q(path)} {q(stage)}")
            staged.append((path, stage))
    for exposure in exposures:
        lines.append(f"mount -t tmpfs -o mode=0755,size=1m qmath-expose {q(exposure.mountpoint)}")
    for path, stage in staged:
        lines.append(f"mkdir -p {q(path)}")
        lines.append(f"mount --move {q(stage)} {q(path)}")
        lines.append(f"mount -o remount,bind,ro {q(path)}")
    lines.append('exec "$@"')
    return "\n".join(lines)


def private_tmp_dirs() -> tuple[str, ...]:
    """The directories bwrap covers with a private tmpfs."""
    dirs = ["/tmp", "/dev/shm"]
    if os.path.isdir("/var/tmp") and not os.path.islink("/var/tmp"):
        dirs.append("/var/tmp")
    return tuple(dirs)


def _bwrap_args(
    tools: Tools, workdir: str, limits: Limits, rebinds: tuple[str, ...] = ()
) -> list[str]:
    assert tools.bwrap is not None
    size = str(limits.tmpfs_bytes)
    args = [tools.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for directory in private_tmp_dirs():
        args += ["--size", size, "--tmpfs", directory]
    for path in rebinds:
        args += ["--ro-bind", path, path]
    args += ["--bind", workdir, workdir, "--chdir", workdir, "--unshare-all"]
    if tools.bwrap_disable_userns:
        # No nested user namespaces: they would hand the program a fresh set of capabilities
        # to probe the kernel with.
        args += ["--unshare-user", "--disable-userns"]
    args += ["--die-with-parent", "--new-session", "--clearenv"]
    for key, value in sandbox_env(workdir).items():
        args += ["--setenv", key, value]
    return [*args, "--"]


def build_command(
    plan: Plan,
    python: str,
    workdir: str,
    uid: int | None,
    limits: Limits,
    stage_dirs: list[str],
) -> list[str]:
    """The argv that runs ``workdir/main.py`` under ``plan`` (see the module docstring)."""
    tools = plan.tools
    cmd = _prlimit_args(tools, limits)
    # If the executor dies, the kernel kills our direct child, and its chain follows
    # (unshare --kill-child, bwrap --die-with-parent).
    cmd += [tools.setpriv, "--pdeathsig", "KILL", "--"]
    if plan.unshare:
        assert tools.unshare is not None
        cmd += [tools.unshare, *plan.unshare, "--"]
    if plan.exposures:
        cmd += [tools.sh, "-c", expose_script(plan.exposures, stage_dirs), "qmath-expose"]
    if plan.uid_drop:
        if uid is None:
            raise ValueError("this plan drops to a slot uid, but no uid was given")
        cmd += [tools.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        cmd += ["--no-new-privs", "--"]
    if plan.backend == "bwrap":
        cmd += _bwrap_args(tools, workdir, limits, plan.rebinds)
    elif plan.pid_ns:
        # coreutils `timeout` as pid 1 of the namespace: Python as pid 1 would ignore the
        # SIGTERM/SIGINT it sends itself. `timeout` reports a fatal signal of the program as
        # exit 128+sig without printing anything (a shell would add "Killed" to stderr), and
        # its own clock is a backstop should the executor die mid-call.
        assert tools.timeout is not None
        cmd += [tools.timeout, "-s", "KILL", str(limits.backstop_s)]
    return [*cmd, python, "-I", "-B", os.path.join(workdir, "main.py")]


# --- interpreter --------------------------------------------------------------------------

_INFO_CODE = (
    "import json, sys; print(json.dumps({'version': sys.version, 'prefix': sys.prefix, "
    "'base_prefix': sys.base_prefix, 'exec_prefix': sys.exec_prefix, "
    "'base_exec_prefix': sys.base_exec_prefix, 'path': sys.path}))"
)


def interpreter_info(python: str) -> dict:
    """Version and import paths of ``python`` as run directly by us (the reference)."""
    try:
        out = subprocess.run(
            [python, "-I", "-c", _INFO_CODE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SandboxUnavailable(f"cannot run the sandbox interpreter {python!r}: {exc}") from exc
    if out.returncode != 0:
        raise SandboxUnavailable(
            f"the sandbox interpreter {python!r} failed: {out.stderr.strip()[-500:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _needed_dirs(python: str, info: dict) -> list[str]:
    """Directories the interpreter must reach: prefixes, sys.path, each hop of its symlinks."""
    dirs = {info[k] for k in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix")}
    dirs.update(p for p in info["path"] if p and os.path.isdir(p))
    hop = os.path.abspath(python)
    for _ in range(40):
        dirs.add(os.path.dirname(hop))
        if not os.path.islink(hop):
            break
        hop = os.path.join(os.path.dirname(hop), os.readlink(hop))
    return sorted({os.path.realpath(d) for d in dirs if os.path.isdir(d)})


def _blocked_ancestor(path: str) -> str | None:
    """The topmost strict ancestor of ``path`` that other users may not search, if any."""
    current = "/"
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths inside another listed path: binding a directory brings its subdirectories."""
    return [p for p in paths if not any(p != q and p.startswith(q + "/") for q in paths)]


def plan_rebinds(python: str, info: dict) -> tuple[str, ...]:
    """Interpreter directories that bwrap's private tmpfs mounts would hide."""
    covered = [os.path.realpath(d) for d in private_tmp_dirs()]
    # The unresolved path of the interpreter matters too: a venv's bin/ in /tmp may hold a
    # symlink to a Python elsewhere, and the command runs it by that path.
    candidates = {*_needed_dirs(python, info), os.path.dirname(os.path.abspath(python))}
    hidden = [
        d for d in sorted(candidates) if any(d == c or d.startswith(c + "/") for c in covered)
    ]
    return tuple(_outermost(hidden))


def plan_exposures(python: str, info: dict) -> tuple[Exposure, ...]:
    groups: dict[str, list[str]] = {}
    for path in _needed_dirs(python, info):
        blocked = _blocked_ancestor(path)
        if blocked is not None:
            groups.setdefault(blocked, []).append(path)
    exposures = []
    for mountpoint, paths in sorted(groups.items()):
        exposures.append(Exposure(mountpoint, tuple(_outermost(paths))))
    return tuple(exposures)


# --- candidates and probing ---------------------------------------------------------------


def _candidates(
    config: SandboxConfig,
    tools: Tools,
    exposures: tuple[Exposure, ...],
    rebinds: tuple[str, ...] = (),
) -> list[Plan]:
    """Plans to try, strongest first, restricted to the requested isolation mode."""
    root = os.geteuid() == 0
    plans: list[Plan] = []
    if config.isolation in ("auto", "bwrap") and tools.bwrap:
        if root and tools.unshare:
            mount = ("--mount", "--propagation", "private") if exposures else ()
            ns = ("--pid", "--fork", "--kill-child", *mount)
            plans.append(Plan("bwrap", tools, True, ns, exposures, rebinds))
        plans.append(Plan("bwrap", tools, False, (), rebinds=rebinds))
    if config.isolation in ("auto", "rlimits"):
        plans += _weak_candidates(tools, exposures, root)
    return plans


def _weak_candidates(tools: Tools, exposures: tuple[Exposure, ...], root: bool) -> list[Plan]:
    plans: list[Plan] = []
    pid = ("--pid", "--fork", "--kill-child")
    namespaces = tools.unshare is not None and tools.timeout is not None
    if root:
        mount = ("--mount", "--propagation", "private") if exposures else ()
        if namespaces:
            plans.append(Plan("rlimits", tools, True, (*pid, "--net", *mount), exposures))
            plans.append(Plan("rlimits", tools, True, (*pid, *mount), exposures))
        if not exposures:
            plans.append(Plan("rlimits", tools, True, ()))
        if namespaces:
            plans.append(Plan("rlimits", tools, False, (*pid, "--net")))
    elif namespaces:
        plans.append(Plan("rlimits", tools, False, ("--user", *pid, "--net")))
    plans.append(Plan("rlimits", tools, False, ()))
    return plans


_PROBE_CODE = """\
import contextlib, json, os, sys
out = {"uid": os.getuid(), "version": sys.version, "prefix": sys.prefix,
       "base_prefix": sys.base_prefix}
for ns in ("net", "pid", "mnt"):
    try:
        out[ns] = os.readlink(f"/proc/self/ns/{ns}")
    except OSError:
        out[ns] = None
with open("probe-owner", "w") as f:
    f.write("x")
for path in PROBE_OUTSIDE:  # must not be visible on the host afterwards
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write("x")
print(json.dumps(out))
"""


@dataclass
class _ProbeOutcome:
    ok: bool
    detail: str
    data: dict = field(default_factory=dict)


def _host_ns(name: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/ns/{name}")
    except OSError:
        return None


def _run_probe(plan: Plan, python: str, workspace: Workspace, uid: int | None) -> _ProbeOutcome:
    """Run the probe program through ``plan``; check it started the right interpreter."""
    workdir = workspace.new_call_dir(uid if plan.uid_drop else None)
    token = uuid.uuid4().hex
    outside = (os.path.join(workspace.base, f"probe-{token}"), f"/tmp/qmath-probe-{token}")
    code = _PROBE_CODE.replace("PROBE_OUTSIDE", repr(outside))
    workspace.write_program(workdir, code, uid if plan.uid_drop else None)
    limits = Limits(1 << 30, 60, 1 << 26, 4096, 64 << 20, 60)
    stages = [workspace.stage_dir(i) for i in range(plan.stage_slots)]
    cmd = build_command(plan, python, workdir, uid, limits, stages)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            cwd=workdir,
            env=sandbox_env(workdir),
            stdin=subprocess.DEVNULL,
        )
        owner = os.stat(os.path.join(workdir, "probe-owner")).st_uid
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _ProbeOutcome(False, f"{type(exc).__name__}: {exc}")
    finally:
        if plan.uid_drop and uid is not None:
            kill_uid(uid)
        force_rmtree(workdir)
        leaked = [p for p in outside if os.path.lexists(p)]
        for path in leaked:
            os.unlink(path)
    if proc.returncode != 0:
        return _ProbeOutcome(False, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["host_owner"] = owner
    data["leaked"] = leaked
    return _ProbeOutcome(True, "ok", data)


def _report(plan: Plan, probe: dict, uid: int | None) -> IsolationReport:
    uid_isolated = plan.uid_drop and probe["host_owner"] == uid and probe["uid"] != 0
    report = IsolationReport(
        backend=plan.backend,
        strong=False,
        uid_isolated=uid_isolated,
        network_isolated=probe.get("net") not in (None, _host_ns("net")),
        filesystem_isolated=plan.backend == "bwrap" and not probe["leaked"],
        pid_namespace=probe.get("pid") not in (None, _host_ns("pid")),
    )
    report.strong = (
        report.backend == "bwrap"
        and report.filesystem_isolated
        and report.network_isolated
        and report.pid_namespace
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: IsolationReport) -> list[str]:
    notes = []
    if report.backend != "bwrap":
        notes.append(
            "only weak isolation (rlimits backend): the program sees the host filesystem and "
            "can write wherever its uid may; install bubblewrap (apt-get install bubblewrap)"
        )
    elif not report.strong:
        notes.append("bubblewrap runs, but not every namespace could be verified as private")
    if not report.uid_isolated:
        if os.geteuid() == 0:
            notes.append(
                "running as root without a per-call uid: RLIMIT_NPROC is not enforced for "
                "root, so the process limit does not hold"
            )
        else:
            notes.append(
                "not root: no per-call uid; the process limit is approximate (RLIMIT_NPROC "
                "counts every process of this user) and leftovers are found by session only"
            )
    if not report.network_isolated:
        notes.append("network is NOT isolated: the program can open connections")
    if not report.pid_namespace and not report.uid_isolated:
        notes.append("no pid namespace and no per-call uid: detached daemons may survive")
    return notes


@dataclass(frozen=True)
class Detection:
    plan: Plan
    report: IsolationReport
    info: dict


_CACHE: dict[tuple, Detection] = {}
_CACHE_LOCK = threading.Lock()


def detect(config: SandboxConfig) -> Detection:
    """Probe the candidates once per (interpreter, mode, user) in this process.

    The interpreter is keyed by its path as given, not its realpath: two venvs' ``python``
    are symlinks to one base interpreter but have different prefixes and directories.
    """
    key = (os.path.abspath(config.python), config.isolation, os.geteuid(), config.workdir_root)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _detect_uncached(config)
        return _CACHE[key]


def _detect_uncached(config: SandboxConfig) -> Detection:
    tools = Tools.find()
    info = interpreter_info(config.python)
    exposures = plan_exposures(config.python, info) if os.geteuid() == 0 else ()
    plans = _candidates(config, tools, exposures, plan_rebinds(config.python, info))
    if not plans:
        raise SandboxUnavailable(_no_backend_reason(config, tools))
    failures: list[str] = []
    workspace = Workspace(config.workdir_root, max(p.stage_slots for p in plans))
    lease = _probe_lease(config) if any(p.uid_drop for p in plans) else None
    try:
        for plan in plans:
            uid = lease.uid if (lease and plan.uid_drop) else None
            if plan.uid_drop and uid is None:
                continue
            outcome = _run_probe(plan, config.python, workspace, uid)
            problem = outcome.detail if not outcome.ok else _mismatch(outcome.data, info)
            if problem is None:
                report = _report(plan, outcome.data, uid)
                _note_skipped(report, failures)
                return Detection(plan, report, info)
            failures.append(f"{_describe(plan)}: {problem}")
            log.debug("sandbox candidate rejected: %s", failures[-1])
    finally:
        if lease is not None:
            lease.release()
        workspace.close()
    raise SandboxUnavailable(
        f"no sandbox backend works for isolation={config.isolation!r}: " + "; ".join(failures)
    )


def _probe_lease(config: SandboxConfig) -> UidLease | None:
    try:
        return lease_uids(1, config.uid_first, config.uid_count)[0]
    except UidExhausted as exc:
        log.warning("no sandbox uid could be leased for the probe: %s", exc)
        return None


def _mismatch(probe: dict, info: dict) -> str | None:
    """Why a probe that ran is still unacceptable (a different interpreter started)."""
    for key in ("version", "prefix", "base_prefix"):
        if probe.get(key) != info.get(key):
            return f"sandboxed interpreter differs in {key}: {probe.get(key)!r} != {info[key]!r}"
    return None


def _describe(plan: Plan) -> str:
    uid = "uid drop" if plan.uid_drop else "no uid drop"
    unshare = f", unshare {' '.join(plan.unshare)}" if plan.unshare else ""
    return f"{plan.backend} ({uid}{unshare})"


def _note_skipped(report: IsolationReport, failures: list[str]) -> None:
    if failures:
        report.warnings.append("stronger candidates failed their probe: " + "; ".join(failures))


def _no_backend_reason(config: SandboxConfig, tools: Tools) -> str:
    if config.isolation == "bwrap" and tools.bwrap is None:
        return "isolation='bwrap' but bubblewrap is not installed (apt-get install bubblewrap)"
    return f"no sandbox candidate for isolation={config.isolation!r}"


def detect_isolation(config: SandboxConfig) -> IsolationReport:
    """Probe (once per process) and report the strongest working isolation for ``config``."""
    return detect(config).report.copy()

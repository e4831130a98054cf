"""Finding and killing the processes a sandboxed call left behind, by scanning ``/proc``.

Killing the child's process group is not enough: untrusted code can ``setsid()`` or double
fork into a new session. What it cannot shed is its uid (each concurrent call runs under its
own unprivileged uid, see :mod:`qmath_megatron.sandbox.uids`), so "every process of uid U" is
exactly "every leftover of the call on slot U". Signals go through a pidfd whose target is
re-checked after opening, so a pid recycled by an unrelated process is never signalled.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    uids: tuple[int, ...]  # real, effective, saved, filesystem
    state: str  # one letter, "Z" for a zombie

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


def _read_status(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:  # exited meanwhile, or not readable
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        uids = tuple(int(x) for x in fields["Uid"].split())
        return ProcInfo(pid, int(fields["PPid"]), uids, fields["State"].split()[0])
    except (KeyError, ValueError, IndexError):
        return None


def iter_processes(include_self: bool = False) -> Iterator[ProcInfo]:
    """All processes visible in ``/proc`` (except the calling one unless asked)."""
    me = -1 if include_self else os.getpid()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            info = _read_status(int(name))
            if info is not None:
                yield info


def processes_of_uid(uid: int, include_zombies: bool = False) -> list[ProcInfo]:
    return [p for p in iter_processes() if uid in p.uids[:3] and (include_zombies or not p.zombie)]


def cwd_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def path_inside(path: str | None, directory: str) -> bool:
    """Whether ``path`` (as read from /proc, maybe marked deleted) lies in ``directory``."""
    if not path or not directory:
        return False
    path = path.removesuffix(" (deleted)")
    return path == directory or path.startswith(directory + "/")


def cmdline_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def kill_verified(pid: int, still_matches: Callable[[ProcInfo], bool]) -> bool:
    """SIGKILL ``pid`` only if, seen through a pidfd, it is still the process we meant.

    The pidfd pins the process identity: if the pid was recycled before ``pidfd_open``, the
    re-read status no longer matches and nothing is sent; if it is recycled after, the pidfd
    refers to the dead original and the signal goes nowhere.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        info = _read_status(pid)
        if info is None or info.zombie or not still_matches(info):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kill_matching(match: Callable[[ProcInfo], bool], timeout: float = 5.0) -> int:
    """Kill every live process that ``match`` selects, rescanning until none is left.

    Rescanning catches children forked between a scan and the kill of their parent; the
    loop converges because a killed process forks no more. Returns how many were signalled.
    """
    killed = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        victims = [p for p in iter_processes() if not p.zombie and match(p)]
        if not victims:
            break
        killed += sum(kill_verified(p.pid, match) for p in victims)
        time.sleep(0.005)
    return killed


def kill_uid(uid: int, timeout: float = 5.0) -> int:
    """Kill every process whose real, effective or saved uid is ``uid``."""
    if uid == 0:
        raise ValueError("refusing to kill every process of root")
    return kill_matching(lambda p: uid in p.uids[:3], timeout)


def wait_uid_clean(uid: int, timeout: float) -> bool:
    """Wait until ``uid`` owns no process at all, zombies included.

    Zombies still count against RLIMIT_NPROC until their parent (often pid 1) reaps them; a
    slot is only handed to the next call once its uid is clean, or its process budget would
    be smaller than configured.
    """
    deadline = time.monotonic() + timeout
    while True:
        if not processes_of_uid(uid, include_zombies=True):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def count_tasks_of_uid(uid: int) -> int:
    """Threads owned by ``uid`` (real uid): what RLIMIT_NPROC actually counts on Linux."""
    total = 0
    for p in iter_processes(include_self=True):
        if p.uids[0] != uid:
            continue
        try:
            total += len(os.listdir(f"/proc/{p.pid}/task"))
        except OSError:
            continue
    return total

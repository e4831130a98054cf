"""Leasing unprivileged uids, one per concurrent sandbox slot.

Why a uid per slot: RLIMIT_NPROC counts all processes of the *real uid* and is not enforced
for root, so a process limit only holds for an unprivileged uid, and only means "this call's
processes" when no other call shares that uid. The same exclusivity makes the cleanup exact:
after a call, every process still owned by the slot's uid is a leftover of that call.

Exclusivity across processes on one host comes from a non-blocking ``flock`` on one lock file
per uid in a root-owned directory: the kernel drops the lock when the holder dies, so a
crashed executor never leaks its uids.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import stat
import tempfile

DEFAULT_UID_FIRST = 61000
DEFAULT_UID_COUNT = 1000


class UidExhausted(RuntimeError):
    """No free uid in the configured range (raised as SandboxUnavailable by callers)."""


def lock_dir() -> str:
    """A directory only the current user can write, for the per-uid lock files.

    ``/run`` is preferred (root-only, cleared at boot); the temp dir is the fallback, where the
    directory is checked to be ours and private so nobody else can pre-create lock files.
    """
    candidates = []
    if os.geteuid() == 0 and os.access("/run", os.W_OK):
        candidates.append("/run/qmath-sandbox/uids")
    candidates.append(os.path.join(tempfile.gettempdir(), f"qmath-sandbox-uids-{os.geteuid()}"))
    last_error: OSError | None = None
    for path in candidates:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise PermissionError(f"{path} is not a directory owned by uid {os.geteuid()}")
            os.chmod(path, 0o700)
            return path
        except OSError as exc:
            last_error = exc
    raise UidExhausted(f"no usable lock directory for sandbox uids: {last_error}")


def _known(lookup, number: int) -> bool:
    try:
        lookup(number)
    except KeyError:
        return False
    return True


def _uid_is_free_for_us(uid: int) -> bool:
    """A uid (and the gid of the same number) that no account or group on this host uses."""
    return not _known(pwd.getpwuid, uid) and not _known(grp.getgrgid, uid)


class UidLease:
    """One uid held exclusively (by flock) until :meth:`release` or process exit."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"UidLease(uid={self.uid}, held={self.held})"


def _try_lock(directory: str, uid: int) -> UidLease | None:
    path = os.path.join(directory, f"{uid}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return UidLease(uid, fd)


def lease_uids(
    count: int, first: int = DEFAULT_UID_FIRST, span: int = DEFAULT_UID_COUNT
) -> list[UidLease]:
    """Lease ``count`` distinct uids from ``[first, first + span)``; all or nothing."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if first < 1000 or span < 1:
        raise ValueError(f"uid range must start at >= 1000 and be non-empty, got {first}+{span}")
    directory = lock_dir()
    leases: list[UidLease] = []
    for uid in range(first, first + span):
        if len(leases) == count:
            break
        if not _uid_is_free_for_us(uid):
            continue
        lease = _try_lock(directory, uid)
        if lease is not None:
            leases.append(lease)
    if len(leases) < count:
        for lease in leases:
            lease.release()
        raise UidExhausted(
            f"only {len(leases)} of {count} sandbox uids free in {first}..{first + span - 1}"
        )
    return leases

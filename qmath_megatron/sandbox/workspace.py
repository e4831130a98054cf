"""Host-side directories of an executor: a private base holding one fresh directory per call.

The base is made by ``mkdtemp`` and set to 0711: the slot uids may traverse it to reach their
own call directory (0700, owned by the slot uid) but cannot list it, so one call cannot find
or enter another's directory. A ``.stage`` subdirectory (0700, root) holds empty mount points
that the interpreter-exposure prelude uses inside each call's private mount namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile


def force_rmtree(path: str) -> None:
    """Delete a tree that hostile code may have made unreadable (chmod 000 directories)."""

    def _retry(func, target, _exc_info) -> None:
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, stat.S_IRWXU)
        with contextlib.suppress(OSError):
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=_retry)
    if os.path.lexists(path):  # a second pass for what the first chmod unlocked
        shutil.rmtree(path, ignore_errors=True)


class Workspace:
    """The executor's base directory; ``close()`` removes it and everything in it."""

    def __init__(self, root: str | None = None, stage_slots: int = 0) -> None:
        parent = root or tempfile.gettempdir()
        self.base = tempfile.mkdtemp(prefix="qmath-sandbox-", dir=parent)
        os.chmod(self.base, 0o711)
        self.stage = os.path.join(self.base, ".stage")
        os.mkdir(self.stage, 0o700)
        self._stage_slots = 0
        self.ensure_stage_slots(stage_slots)

    def ensure_stage_slots(self, count: int) -> None:
        for i in range(self._stage_slots, count):
            os.mkdir(self.stage_dir(i), 0o700)
        self._stage_slots = max(self._stage_slots, count)

    def stage_dir(self, index: int) -> str:
        return os.path.join(self.stage, str(index))

    def new_call_dir(self, uid: int | None) -> str:
        path = tempfile.mkdtemp(prefix="call-", dir=self.base)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    def write_program(self, call_dir: str, code: str, uid: int | None) -> str:
        path = os.path.join(call_dir, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        if uid is not None:
            os.chown(path, uid, uid)
        return path

    def close(self) -> None:
        force_rmtree(self.base)

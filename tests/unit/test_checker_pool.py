"""The answer checker's worker processes die with the process that owns the checker (a
trainer or `qmath eval` killed with SIGKILL leaves no checker workers behind), as the data
tools' pools do (data/shards.py die_with_parent)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = """
import sys, time
from qmath_megatron.rewards.checker import AnswerChecker
from tests.unit.test_checker_pool import stuck

checker = AnswerChecker(workers=2, timeout_s=600, check_fn=stuck)
# Two checks that never end: both workers busy inside a task when the owner dies.
import threading
threading.Thread(target=checker.equivalent_many, args=([("1", "1"), ("2", "2")],),
                 daemon=True).start()
print("started", flush=True)
time.sleep(600)
"""


def stuck(reference: str, prediction: str, convention) -> bool:
    time.sleep(600)
    return True


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return proc.children(recursive=True)
    return []


def _workers(owner: psutil.Process) -> list[psutil.Process]:
    """The pool's workers: children of the checker's fork server (they share its command
    line), or of the owner itself with another start method."""
    out = []
    for k in _descendants(owner):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "resource_tracker" in " ".join(k.cmdline()):
                continue
            if k.ppid() != owner.pid or "forkserver" not in " ".join(k.cmdline()):
                out.append(k)
    return out


def test_killed_owner_leaves_no_checker_worker():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], cwd=root, stdout=subprocess.PIPE, text=True
    )
    owner = psutil.Process(proc.pid)
    kids: list[psutil.Process] = []
    try:
        assert proc.stdout.readline().strip() == "started"
        deadline = time.time() + 60
        while time.time() < deadline and len(_workers(owner)) < 2:
            time.sleep(0.2)
        kids = _descendants(owner)
        assert len(_workers(owner)) >= 2, [(k.pid, k.ppid(), k.cmdline()) for k in kids]
        time.sleep(3)  # past their initializer (it warms math-verify up)
        kids = _descendants(owner)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, [k.cmdline() for k in alive]
    finally:
        for k in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.kill()
        proc.kill()

"""A pipeline run's state: ``RUN/pipeline.json`` and each stage's done marker.

- ``RUN/<stage>/stage.json`` is the stage's **done marker**, written last (atomically) when
  its command succeeded: the stage's fingerprint (its resolved settings and command, and
  the output fingerprints of the upstream stages it read), its own output fingerprints,
  wall time and headline metrics. A stage is done exactly when this file exists.
- ``RUN/pipeline.json`` holds the DAG, the recipe, the overrides and every stage's state
  (pending / running / done / failed, seconds, log, last error line, Slurm job id). It is a
  summary for ``status`` and the executors, updated under a lock (Slurm jobs of one run
  update it from different processes); the markers are the truth.

A rerun compares each done stage's recorded settings with the new ones and refuses a
change as ``stage.key: old -> new`` (unless ``--from`` reruns that stage); it also
re-fingerprints the outputs of done stages, so an upstream output changed by hand is
refused too, naming the stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qmath_megatron.data.shards import path_fingerprint
from qmath_megatron.pipeline.stage import Pipeline

STATE_FILE = "pipeline.json"
MARKER = "stage.json"
STATES = ("pending", "running", "done", "failed")


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def outputs_fingerprint(paths: Mapping[str, Path]) -> str:
    """One digest of a stage's outputs (each file's size and SHA-256; large files by their
    head and tail, as the data tools' resume does)."""
    h = hashlib.sha256()
    for name in sorted(paths):
        path = paths[name]
        # A dataset prefix (P for P.bin, P.idx, ...) is the files that start with it.
        files = [path] if path.exists() else sorted(path.parent.glob(glob.escape(path.name) + ".*"))
        if not files:
            raise FileNotFoundError(f"output {name} not found: {path}")
        h.update(name.encode())
        for f in files:
            h.update(f.name.encode())
            h.update(json.dumps(path_fingerprint(f), sort_keys=True).encode())
    return h.hexdigest()


def read_marker(run: Path, name: str) -> dict | None:
    path = run / name / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a marker is written atomically; an unreadable one is not a done stage


def write_marker(run: Path, name: str, record: dict) -> None:
    atomic_write_json(run / name / MARKER, record)


class RunState:
    """``RUN/pipeline.json``: read-modify-write under an exclusive lock."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.path = run / STATE_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict:
        if not self.path.is_file():
            raise FileNotFoundError(f"no pipeline run in {self.run} ({STATE_FILE} not found)")
        return json.loads(self.path.read_text())

    @contextlib.contextmanager
    def update(self) -> Iterator[dict]:
        self.run.mkdir(parents=True, exist_ok=True)
        with open(self.run / f".{STATE_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
            yield data
            atomic_write_json(self.path, data)

    def set_stage(self, name: str, **fields: Any) -> None:
        with self.update() as data:
            data.setdefault("stages", {}).setdefault(name, {}).update(fields)


LOCK = ".lock"


@contextlib.contextmanager
def stage_lock(run: Path, name: str, wait_s: float = 60.0, log=None) -> Iterator[int]:
    """Hold ``RUN/<stage>/.lock`` while the stage runs; yields its fd, which the stage's
    command inherits, so the lock stays held until that process is gone too (a killed
    runner's child is still finishing). Waits up to ``wait_s`` for an earlier holder, then
    refuses naming the stage."""
    path = run / name / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.time() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    raise FileExistsError(
                        f"stage {name} is running in another process ({path} is locked)"
                    ) from None
                if log is not None and not told:
                    log(f"qmath pipeline: waiting for an earlier run of stage {name} to exit")
                    told = True
                time.sleep(0.2)
        yield fd
    finally:
        os.close(fd)


def stage_is_running(run: Path, name: str) -> bool:
    """True while some process holds the stage's lock."""
    path = run / name / LOCK
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def stage_fingerprint(pipeline: Pipeline, run: Path, name: str) -> dict:
    """What a stage's result depends on: its command line and resolved settings, and the
    recorded output fingerprints of the upstream stages it reads (those must be done)."""
    inputs: dict[str, str] = {}
    for up in pipeline.stages[name].upstream():
        marker = read_marker(run, up)
        if marker is None:
            raise ValueError(f"stage {name} needs {up}, which is not done")
        inputs[up] = marker["outputs_fingerprint"]
    return {
        "settings": pipeline.resolve(run, name),
        "argv": pipeline.argv(run, name),
        "inputs": inputs,
    }


def settings_diff(stage: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``stage.key: old -> new`` for every setting that differs (added or removed keys
    show ``(unset)``)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b:
            lines.append(f"{stage}.{key}: {_show(a)} -> {_show(b)}")
    return lines


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def now() -> float:
    return round(time.time(), 3)

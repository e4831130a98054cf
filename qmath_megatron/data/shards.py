"""The one resumable per-shard mechanism of every data tool.

It owns, for tokenize, decontaminate, dedup, classify, recall, score, synthesize and the
post-training data steps:

- **input discovery and ordering**: :func:`discover` expands globs (sorted per pattern, each
  file once) and names each input by its path relative to the common root of all inputs;
- **output naming**: a shard's output is ``OUT/<kind>/<relative path>`` with ``.jsonl``
  appended unless the name already ends in ``.jsonl`` (``a/x.jsonl`` and ``b/x.jsonl`` stay
  apart, so do ``x.jsonl`` and ``x.jsonl.gz`` -> ``x.jsonl.gz.jsonl``, ``shard.0.jsonl`` and
  ``shard.1.jsonl``); inputs whose names would still collide are refused before any work;
- **a fingerprint** of the inputs (size and a SHA-256 of the whole content, cached per
  file by device/inode/size/mtime/ctime so an unchanged file is not re-read; ``cp -p`` keeps
  mtime but not ctime, so a same-size edit is re-hashed and caught) and of every setting the
  tool declares as changing its output; stored in ``OUT/.qmath/manifest.json``;
- **refusing or redoing**: a rerun whose fingerprint differs is refused with a message
  listing what changed, unless ``overwrite`` (``--overwrite``), which removes the earlier
  outputs and starts over; a rerun with the same fingerprint resumes and says so;
- **atomic per-shard done markers**: a shard's outputs are written under hidden temporary
  names, renamed into place, and only then is ``OUT/.qmath/done/<step>/<index>.json``
  written (by rename). A run killed at any point (``kill -9``) resumes to byte-identical
  outputs; a shard whose function raised is never marked done;
- **a worker pool with per-worker state**: ``workers > 1`` runs shards in spawned processes
  (``init(*init_args)`` once per worker, e.g. to load a model); a worker that dies (killed by
  the OOM killer) fails the run with :class:`WorkerDiedError` instead of hanging.

Usage (a per-record tool)::

    from qmath_megatron.data.shards import ShardJob, discover, plan

    def keep_short(shard, out, state) -> dict:          # module level: workers import it
        kept = rejected = 0
        with out.open("kept") as k, out.open("rejects") as r:
            for item in shard.records(["text"]):
                if isinstance(item, Reject):
                    r.write(item.to_json(shard.file.rel) + "\\n"); rejected += 1
                elif len(item.text) < state["max_chars"]:
                    k.write(json.dumps(item.obj, ensure_ascii=False) + "\\n"); kept += 1
        return {"kept": kept, "rejected": rejected}

    shards = plan(discover(["corpus/**/*.jsonl.zst"]))
    job = ShardJob("short", "out/", kinds=("kept", "rejects"), settings={"max_chars": 100},
                   overwrite=False)
    run = job.open(shards)                              # fingerprint check (may refuse)
    results = run.map("filter", keep_short, workers=4, init=dict, init_args=({"max_chars": 100},))
    # results[i] is shard i's dict (fresh or read back from its done marker)

``run.resumed`` says how many shards were already done. Global state between steps (e.g.
dedup's clusters) goes through :meth:`ShardRun.save_state` / :meth:`ShardRun.load_state`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from qmath_megatron.data.readers import (
    Record,
    Reject,
    expand_inputs,
    input_format,
    iter_records,
)

STATE_DIR = ".qmath"
MANIFEST_VERSION = 1


class WorkerDiedError(ChildProcessError):
    """A worker process died (killed by a signal, e.g. the out-of-memory killer)."""


class OutputLockedError(FileExistsError):
    """Another run holds the lock of this output (a one-line CLI error)."""


# --------------------------------------------------------------------------- output safety


def refuse_inputs_as_outputs(
    inputs: Sequence[str | Path], outputs: Sequence[str | Path], dirs: Sequence[str | Path] = ()
) -> None:
    """ValueError naming the first input that is also an output (a file in ``outputs``, or
    a file under one of the run-state directories ``dirs``).

    Paths are compared resolved (symlinks, ``..``, relative paths), so an ``--overwrite``
    can never delete or truncate a file the run is about to read.
    """
    ours = {os.path.realpath(p): Path(p) for p in outputs}
    roots = [os.path.realpath(d) for d in dirs]
    for p in inputs:
        real = os.path.realpath(p)
        if real in ours:
            raise ValueError(
                f"the output {ours[real]} would overwrite the input {p}; choose another output"
            )
        for root in roots:
            if real.startswith(root + os.sep):
                raise ValueError(
                    f"the run directory {root} would overwrite the input {p}; choose another output"
                )


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``output`` for one run (``.NAME.lock`` beside it).

    A second run on the same output refuses with :class:`OutputLockedError` naming the
    holder's pid. ``flock`` locks die with their process, so a killed run never leaves a
    stale lock; the file is removed on release.
    """
    out = Path(output)
    real = Path(os.path.realpath(out))  # one lock whichever path names the output
    lock = real.with_name(f".{real.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise OutputLockedError(
                f"{out} is being written by another run (pid {holder}); wait for it to "
                "finish or choose another output"
            ) from None
        # The holder before us may have removed the file after we opened it: lock the
        # file that is at the path now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def die_with_parent(parent_pid: int, signum: int | None = None) -> None:
    """Make this (worker) process get ``signum`` (default SIGKILL) when its parent dies
    (Linux ``PR_SET_PDEATHSIG``, kept across exec), so a killed tool never leaves its pool
    behind; a pool ``initializer``. Exits at once if the parent is already gone."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL if signum is None else signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: nothing to bind to
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def remove_stale_partials(pattern_prefix: str | Path) -> list[Path]:
    """Remove ``PREFIX.partial-PID*`` files whose PID is no longer running (left by a run
    that was killed); returns the removed paths. Files of a live PID are left alone."""
    base = Path(pattern_prefix)
    removed = []
    for p in base.parent.glob(f"{glob.escape(base.name)}.partial-*"):
        pid = p.name[len(base.name) + len(".partial-") :].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rel: str  # relative to the common root of all inputs, "/"-separated
    format: str  # see readers.input_format


def output_name(rel: str) -> str:
    """Output file name of an input: its relative path, ``.jsonl`` appended unless present."""
    return rel if rel.endswith(".jsonl") else rel + ".jsonl"


def discover(patterns: Sequence[str]) -> list[InputFile]:
    """Input files (globs expanded in sorted order per pattern, each file once), named by
    their path relative to the common root of all inputs. Refuses (ValueError, before any
    work) inputs whose output names would collide, e.g. ``x.json`` next to ``x.json.jsonl``."""
    paths = expand_inputs(patterns)
    root = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    files = [
        InputFile(str(p), Path(os.path.relpath(p, root)).as_posix(), input_format(p)) for p in paths
    ]
    by_name: dict[str, list[str]] = {}
    for f in files:
        by_name.setdefault(output_name(f.rel).lower(), []).append(f.path)
    clashes = [paths for paths in by_name.values() if len(paths) > 1]
    if clashes:
        raise ValueError(
            "input files would write the same output file (names equal up to case or a "
            f"'.jsonl' suffix): {clashes[:3]}; rename or split them into separate runs"
        )
    return files


@dataclass(frozen=True)
class Shard:
    """A unit of work: a whole input file, or a byte range (plain JSONL) / row-group range
    (Parquet) of one when :func:`plan` is given ``chunk_bytes``."""

    index: int
    file: InputFile
    name: str  # the output name, relative to an output kind's directory
    start: int = 0
    end: int = -1

    def records(
        self,
        text_keys: Sequence[str] = ("text",),
        *,
        allow_truncated: bool = False,
        text_only: bool = False,
    ) -> Iterator[Record | Reject]:
        """Every line of the shard as a Record or a Reject (readers.iter_records)."""
        for item in iter_records(
            self.file.path,
            text_keys,
            start=self.start,
            end=self.end,
            allow_truncated=allow_truncated,
            text_only=text_only,
        ):
            if isinstance(item, Reject):
                item.source = self.file.rel
            yield item

    def size(self) -> int:
        """Bytes of input this shard covers (for progress)."""
        if self.end >= 0 and self.file.format == "jsonl":
            return self.end - self.start
        return os.path.getsize(self.file.path) if self.start == 0 else 0


def _jsonl_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int]]:
    size = os.path.getsize(path)
    if size == 0:
        return [(0, 0)]
    ranges, start = [], 0
    with open(path, "rb") as f:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                ranges.append((start, size))
                break
            f.seek(target)
            f.readline()  # move to the start of the next line
            end = f.tell()
            ranges.append((start, end))
            start = end
    return ranges


def plan(files: Sequence[InputFile], chunk_bytes: int | None = None) -> list[Shard]:
    """Shards in input order: one per file, or (``chunk_bytes``) plain JSONL cut into byte
    ranges at line starts and Parquet into row groups; named ``<name>`` for a file that is
    one shard and ``<name>.part-NNNNN`` otherwise. Depends only on the inputs and
    ``chunk_bytes``, never on the worker count."""
    shards: list[Shard] = []
    for f in files:
        base = output_name(f.rel)
        ranges: list[tuple[int, int]] = [(0, -1)]
        if chunk_bytes is not None and f.format == "jsonl":
            ranges = _jsonl_ranges(f.path, max(int(chunk_bytes), 1))
        elif chunk_bytes is not None and f.format == "parquet":
            import pyarrow.parquet as pq

            try:
                groups = pq.ParquetFile(f.path).metadata.num_row_groups
            except Exception as exc:
                raise ValueError(f"{f.path}: unreadable Parquet file ({exc})") from None
            ranges = [(g, g + 1) for g in range(groups)] or [(0, 0)]
        for part, (start, end) in enumerate(ranges):
            name = base if len(ranges) == 1 else f"{base}.part-{part:05d}"
            shards.append(Shard(len(shards), f, name, start, end))
    return shards


# --------------------------------------------------------------------------- fingerprints


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def path_fingerprint(path: str | Path, full_hash_below: int = 64 << 20) -> dict[str, Any]:
    """Fingerprint of a settings file or directory (a model, a benchmark): for each file its
    size and SHA-256 (files above ``full_hash_below`` bytes: size, mtime and the SHA-256 of
    their first and last MiB, so multi-GB weights are not re-read on every run)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out: dict[str, Any] = {}
    for p in files:
        size = p.stat().st_size
        if size <= full_hash_below:
            digest = file_digest(p)
        else:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read(1 << 20))
            digest = f"{p.stat().st_mtime_ns}:{h.hexdigest()}"
        out[p.relative_to(path).as_posix() if path.is_dir() else p.name] = [size, digest]
    return out


def _input_fingerprints(files: Sequence[InputFile], cache_file: Path | None, threads: int):
    cache: dict[str, Any] = {}
    if cache_file is not None and cache_file.is_file():
        with contextlib.suppress(ValueError):
            cache = json.loads(cache_file.read_text())
    keys = {f.path: _stat_key(f.path) for f in files}
    todo = [f.path for f in files if (cache.get(f.path) or [None])[:-1] != keys[f.path]]
    # hashlib releases the GIL on large buffers: threads hash files in parallel.
    with cf.ThreadPoolExecutor(max(1, min(threads, len(todo) or 1))) as pool:
        for p, digest in zip(todo, pool.map(file_digest, todo)):
            cache[p] = keys[p] + [digest]
    prints = [{"rel": f.rel, "size": keys[f.path][2], "sha256": cache[f.path][-1]} for f in files]
    return prints, {f.path: cache[f.path] for f in files}


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every top-level key whose value differs (values shortened):
    the message of a refused resume."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key), default=str), json.dumps(new.get(key), default=str)
            a, b = (a if len(a) < 80 else a[:77] + "..."), (b if len(b) < 80 else b[:77] + "...")
            changes.append(f"{key}: {a} -> {b}")
    return changes


def _describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    if old.get("tool") != new["tool"]:
        return [f"it was written by `{old.get('tool')}`, not `{new['tool']}`"]
    changes = [f"setting {c}" for c in settings_changes(old.get("settings", {}), new["settings"])]
    o_in = {i["rel"]: i for i in old.get("inputs", [])}
    n_in = {i["rel"]: i for i in new["inputs"]}
    for rel in sorted(set(o_in) | set(n_in)):
        if rel not in n_in:
            changes.append(f"input {rel} is no longer given")
        elif rel not in o_in:
            changes.append(f"input {rel} is new")
        elif o_in[rel] != n_in[rel]:
            changes.append(f"input {rel} changed (content differs)")
    if not changes and old.get("shards") != new["shards"]:
        changes.append("the inputs are cut into other shards")
    if not changes and [i["rel"] for i in old.get("inputs", [])] != list(n_in):
        changes.append("the input order changed")
    return changes or ["the run format changed"]


# --------------------------------------------------------------------------- running


@dataclass
class ShardJob:
    """What a tool writes and what its output depends on.

    ``output``: the tool's output directory; ``kinds``: the subdirectories each shard writes
    one file into (``OUT/<kind>/<shard.name>``; e.g. kept, removed, rejects); ``settings``:
    every setting that changes the output (JSON-serialisable; fingerprint files it reads,
    such as a model or a benchmark, with :func:`path_fingerprint`); ``extra_outputs``:
    other paths the tool writes (removed by ``overwrite``); ``state_dir``: where the
    manifest and markers live (default ``OUT/.qmath``)."""

    tool: str
    output: str | Path
    kinds: Sequence[str]
    settings: Mapping[str, Any]
    overwrite: bool = False
    extra_outputs: Sequence[str | Path] = ()
    state_dir: str | Path | None = None
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    def open(self, shards: Sequence[Shard], *, hash_threads: int = 4) -> ShardRun:
        return ShardRun(self, shards, hash_threads=hash_threads)


def _writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {path} is not writable")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ShardOutput:
    """Temporary output files of one shard; published (renamed) after the function returns."""

    def __init__(self, out_dir: Path, kinds: Sequence[str], name: str):
        self.out_dir, self.kinds, self.name = out_dir, kinds, name
        self._files: dict[tuple[str, str], Path] = {}
        self._open: list[IO] = []

    def path(self, kind: str, suffix: str = "") -> Path:
        """Temporary path of output ``kind`` (+ ``suffix``, e.g. ``.bin``); published as
        ``OUT/<kind>/<name><suffix>``."""
        if kind not in self.kinds:
            raise KeyError(f"output kind {kind!r} not declared in the job ({list(self.kinds)})")
        final = self.out_dir / kind / f"{self.name}{suffix}"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        self._files[(kind, suffix)] = tmp
        return tmp

    def open(self, kind: str, suffix: str = "") -> IO[str]:
        """A UTF-8 text file for output ``kind`` (``\\n`` line ends, closed by the runner)."""
        f = open(self.path(kind, suffix), "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self._open.append(f)
        return f

    def _publish(self) -> None:
        for f in self._open:
            f.close()
        for kind in self.kinds:  # every kind gets a file, empty when nothing was written
            if not any(k == kind for k, _ in self._files):
                self.path(kind).write_bytes(b"")
        for (kind, suffix), tmp in self._files.items():
            os.replace(tmp, self.out_dir / kind / f"{self.name}{suffix}")

    def _discard(self) -> None:
        for f in self._open:
            with contextlib.suppress(OSError):
                f.close()
        for tmp in self._files.values():
            tmp.unlink(missing_ok=True)


_WORKER: dict[str, Any] = {}


def _pool_worker_init(init: Callable[..., Any] | None, init_args: tuple, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a killed tool must not leave its workers behind
    _worker_init(init, init_args)


def _worker_init(init: Callable[..., Any] | None, init_args: tuple) -> None:
    # An exception here would only break the pool ("terminated abruptly"): keep it and
    # raise it from the first shard, so the caller sees the real error (e.g. a bad model).
    try:
        _WORKER["state"] = init(*init_args) if init is not None else None
    except Exception as exc:
        _WORKER["init_error"] = exc


def _do_shard(process, shard: Shard, out_dir: str, kinds: Sequence[str], marker: str) -> dict:
    if "init_error" in _WORKER:
        raise _WORKER["init_error"]
    out = ShardOutput(Path(out_dir), kinds, shard.name)
    try:
        result = process(shard, out, _WORKER.get("state"))
        out._publish()
    except BaseException:
        out._discard()
        raise
    if not isinstance(result, dict):
        raise TypeError(f"a shard function must return a dict, got {type(result).__name__}")
    # The marker is written last, by rename: it exists only for a complete shard.
    _atomic_write(Path(marker), json.dumps({"shard": shard.name, "result": result}))
    return result


class ShardRun:
    """A job opened on its shards: fingerprint checked, directories ready."""

    def __init__(self, job: ShardJob, shards: Sequence[Shard], *, hash_threads: int = 4):
        self.job, self.shards = job, list(shards)
        self.out = Path(job.output)
        self.state = Path(job.state_dir) if job.state_dir is not None else self.out / STATE_DIR
        self.log = job.log
        _writable_dir(self.out)
        cache = self.state / "inputs.json"
        files = list({s.file.path: s.file for s in self.shards}.values())
        prints, stat_cache = _input_fingerprints(
            files, cache if cache.is_file() else None, hash_threads
        )
        manifest = {
            "version": MANIFEST_VERSION,
            "tool": job.tool,
            "settings": json.loads(json.dumps(dict(job.settings), default=str)),
            "inputs": prints,
            "shards": [s.name for s in self.shards],
        }
        manifest_file = self.state / "manifest.json"
        if job.overwrite:
            self._remove_outputs()
        elif manifest_file.is_file():
            try:
                old = json.loads(manifest_file.read_text())
            except ValueError:
                old = {"tool": None}
            if old != manifest:
                changes = _describe_changes(old, manifest)
                raise ValueError(
                    f"{self.out} holds a run with other inputs or settings "
                    f"({'; '.join(changes[:6])}"
                    f"{'; ...' if len(changes) > 6 else ''}); pass --overwrite to redo it, or "
                    "choose another output"
                )
        else:
            # An empty directory is no earlier output (a run killed before its manifest, or
            # a directory the user made).
            existing = [
                p
                for p in self._output_paths()
                if p.exists() and not (p.is_dir() and not any(p.iterdir()))
            ]
            if existing:
                raise FileExistsError(
                    f"{existing[0]} exists and was not written by a resumable run of "
                    f"`{job.tool}`; pass --overwrite to replace it, or choose another output"
                )
        _writable_dir(self.state)
        _atomic_write(manifest_file, json.dumps(manifest, indent=1))
        _atomic_write(cache, json.dumps(stat_cache))
        for kind in job.kinds:
            _writable_dir(self.out / kind)
        self.resumed: dict[str, int] = {}

    def _output_paths(self) -> list[Path]:
        return [
            self.state,
            *(self.out / k for k in self.job.kinds),
            *(Path(p) for p in self.job.extra_outputs),
        ]

    def _remove_outputs(self) -> None:
        for p in self._output_paths():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    # ---- markers and global state

    def _marker(self, step: str, shard: Shard) -> Path:
        return self.state / "done" / step / f"{shard.index:06d}.json"

    def is_done(self, step: str, shard: Shard) -> bool:
        return self._marker(step, shard).is_file()

    def result(self, step: str, shard: Shard) -> dict:
        return json.loads(self._marker(step, shard).read_text())["result"]

    def save_state(self, name: str, value: Any) -> None:
        """Persist a JSON value for this run (written atomically; cleared by --overwrite)."""
        _atomic_write(self.state / f"{name}.json", json.dumps(value))

    def load_state(self, name: str) -> Any:
        p = self.state / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def path(self, kind: str, shard: Shard, suffix: str = "") -> Path:
        """Published output path of ``kind`` for ``shard``."""
        return self.out / kind / f"{shard.name}{suffix}"

    # ---- the loop

    def map(
        self,
        step: str,
        process: Callable[[Shard, ShardOutput, Any], dict],
        *,
        workers: int = 1,
        init: Callable[..., Any] | None = None,
        init_args: tuple = (),
        describe: Callable[[Shard, dict], str] | None = None,
        on_result: Callable[[Shard, dict], None] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[dict]:
        """Run ``process(shard, out, state)`` for every shard not yet done in ``step``;
        returns every shard's result dict in shard order (read back from the markers for
        shards done earlier). ``kinds`` restricts the outputs of this step (default: the
        job's kinds). ``workers > 1`` uses spawned processes; ``process`` and ``init`` must
        then be module-level functions. ``describe(shard, result)`` makes the per-shard
        progress line (none without it); ``on_result`` is called in this process as each
        shard finishes (e.g. a progress bar)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        kinds = list(self.job.kinds if kinds is None else kinds)
        (self.state / "done" / step).mkdir(parents=True, exist_ok=True)
        todo = [s for s in self.shards if not self.is_done(step, s)]
        done = len(self.shards) - len(todo)
        self.resumed[step] = done
        if done:
            self.log(
                f"{self.job.tool}: resumed {step}: {done} of {len(self.shards)} shard(s) "
                f"already done in {self.out}"
            )
        results: dict[int, dict] = {}
        n_total = len(todo)

        def report(i: int, shard: Shard, result: dict) -> None:
            results[shard.index] = result
            if on_result is not None:
                on_result(shard, result)
            if describe is not None:
                where = "" if shard.end < 0 else f" [{shard.start}:{shard.end}]"
                self.log(
                    f"[{step} {i}/{n_total}] {shard.file.rel}{where}: {describe(shard, result)}"
                )

        out_dir = str(self.out)
        if workers == 1 or len(todo) <= 1:
            if todo:
                _worker_init(init, init_args)
            try:
                for i, shard in enumerate(todo, 1):
                    marker = str(self._marker(step, shard))
                    report(i, shard, _do_shard(process, shard, out_dir, kinds, marker))
            finally:
                _WORKER.clear()
        else:
            self._pool(step, process, todo, workers, init, init_args, kinds, report)
        return [
            results[s.index] if s.index in results else self.result(step, s) for s in self.shards
        ]

    def _pool(self, step, process, todo, workers, init, init_args, kinds, report) -> None:
        ctx = mp.get_context("spawn")
        pool = cf.ProcessPoolExecutor(
            min(workers, len(todo)),
            mp_context=ctx,
            initializer=_pool_worker_init,
            initargs=(init, init_args, os.getpid()),
        )
        futures = {
            pool.submit(_do_shard, process, s, str(self.out), kinds, str(self._marker(step, s))): s
            for s in todo
        }
        ok = False
        try:
            for i, fut in enumerate(cf.as_completed(futures), 1):
                try:
                    report(i, futures[fut], fut.result())
                except cf.process.BrokenProcessPool:
                    running = [
                        futures[f].name
                        for f in futures
                        if not f.done() or (not f.cancelled() and f.exception())
                    ]
                    raise WorkerDiedError(
                        f"a `{self.job.tool}` worker process died while working on "
                        f"{', '.join(running[:4])}{' ...' if len(running) > 4 else ''} "
                        "(killed by a signal, e.g. the out-of-memory killer: try fewer "
                        "--workers); finished shards are kept, rerun the same command to resume"
                    ) from None
            ok = True
        finally:
            if not ok:
                # Stop at once: running workers would otherwise finish their shards first.
                for proc in list(getattr(pool, "_processes", {}).values()):
                    with contextlib.suppress(Exception):
                        proc.kill()
            pool.shutdown(wait=True, cancel_futures=True)


def dumps(obj: dict) -> str:
    """A JSON line as the data tools write records (UTF-8, not ASCII-escaped)."""
    return json.dumps(obj, ensure_ascii=False)


__all__ = [
    "InputFile",
    "OutputLockedError",
    "Shard",
    "ShardJob",
    "ShardOutput",
    "ShardRun",
    "WorkerDiedError",
    "die_with_parent",
    "discover",
    "dumps",
    "file_digest",
    "output_name",
    "path_fingerprint",
    "output_lock",
    "plan",
    "refuse_inputs_as_outputs",
    "remove_stale_partials",
    "settings_changes",
]

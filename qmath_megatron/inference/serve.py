"""``qmath engine serve``: one rollout engine of its own (engines on other GPUs or nodes than
the GRPO trainer), announced through a handle file in a shared directory.

The engine is a :class:`~qmath_megatron.inference.remote.RemoteEngine` server (the process
the trainer would otherwise start itself). Once it answers, ``serve`` writes
``<handle-dir>/engine-<host>-<port>.json`` (mode 0600: it holds the engine's auth key;
written to a hidden temporary name and renamed, so a reader never sees half a file) with
what a :class:`~qmath_megatron.inference.remote.RemoteHandle` needs. The GRPO trainer
(``rl.placement=remote rl.engine_handles=DIR``) waits for ``rl.engines`` such files
(:func:`wait_for_handles`), connects, and never stops these engines. SIGTERM/SIGINT: the
handle file is removed first (no new trainer finds a dying engine), then the engine stops.
A file left behind (SIGKILL) is refused in one line naming it: by :func:`wait_for_handles`
when its ``pid`` is gone from the trainer's node, else when connecting fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qmath_megatron.config.cli import ConfigArgs, build_config

if TYPE_CHECKING:  # the CLI registers this module: no torch import at start-up
    from qmath_megatron.inference.remote import RemoteHandle

HANDLE_PREFIX, HANDLE_SUFFIX = "engine-", ".json"
SERVE_TRANSFERS = ("auto", "qmath_shm", "nccl")  # ipc needs the trainer's own GPU


@dataclass
class ServeConfig:
    """``qmath engine serve``: the engine's model, where it is announced, its vLLM settings."""

    model: str  # HF model directory the engine starts from
    handle_dir: str  # shared directory the handle file goes to
    host: str = "0.0.0.0"  # every interface; the handle file carries the routable address
    weight_transfer: Literal["auto", "qmath_shm", "nccl"] = "auto"  # auto: shm CPU, nccl GPU
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    dtype: str | None = None  # vLLM dtype (CPU default float32)
    seed: int = 0
    skip_tokenizer_init: bool = False  # token ids only (a model directory without a tokenizer)


_FIELDS = {
    "host": str,
    "port": int,
    "authkey": str,
    "model_dir": str,
    "backend": str,
    "workers": int,
    "bucket_bytes": int,
}


def handle_filename(host: str, port: int) -> str:
    """``engine-<host>-<port>.json``: unique per listening socket, so engines sharing a
    directory (several per node, many nodes) never collide."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    return f"{HANDLE_PREFIX}{safe}-{port}{HANDLE_SUFFIX}"


def handle_record(handle: RemoteHandle) -> dict[str, Any]:
    """The handle file's JSON object."""
    return {
        "host": handle.host,
        "port": handle.port,
        "authkey": handle.authkey.hex(),
        "model_dir": handle.model_dir,
        "backend": handle.backend,
        "workers": handle.workers,
        "bucket_bytes": handle.bucket_bytes,
        "node": handle.node or socket.gethostname(),
        "pid": os.getpid(),
    }


def write_handle_file(directory: str | Path, handle: RemoteHandle) -> Path:
    """Write ``handle`` atomically (hidden temporary file, mode 0600, then rename) into
    ``directory``; returns the file's path."""
    directory = Path(directory)
    path = directory / handle_filename(handle.host, handle.port)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(handle_record(handle), f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_handle_file(path: str | Path) -> RemoteHandle:
    """Parse and validate one handle file; ValueError naming the file on anything wrong."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"engine handle file {path}: unreadable ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"engine handle file {path}: not a JSON object")
    for key, kind in _FIELDS.items():
        value = record.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"engine handle file {path}: {key!r} missing or not {kind.__name__}")
    if record["backend"] not in ("qmath_shm", "nccl", "ipc"):
        raise ValueError(f"engine handle file {path}: unknown backend {record['backend']!r}")
    if not 0 < record["port"] < 65536 or record["workers"] < 1 or record["bucket_bytes"] < 1:
        raise ValueError(f"engine handle file {path}: port, workers or bucket_bytes out of range")
    try:
        authkey = bytes.fromhex(record["authkey"])
    except ValueError:
        raise ValueError(f"engine handle file {path}: authkey is not hex") from None
    node, pid = record.get("node"), record.get("pid")
    from qmath_megatron.inference.remote import RemoteHandle

    return RemoteHandle(
        record["host"],
        record["port"],
        authkey,
        record["model_dir"],
        record["backend"],
        record["bucket_bytes"],
        record["workers"],
        node if isinstance(node, str) else None,
        handle_file=str(path),
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
    )


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def stale_reason(handle: RemoteHandle) -> str | None:
    """Why the engine a handle file announces is certainly not running, or None: its
    ``qmath engine serve`` process (the file's ``pid``) is gone from this node. A file of
    another node is not judged here (its pid means nothing on this one): connecting to it
    fails, naming the file, if its engine does not answer."""
    if handle.pid is None or handle.node != socket.gethostname():
        return None
    if _pid_running(handle.pid):
        return None
    return f"its `qmath engine serve` process {handle.pid} is not running"


def stale_message(path: str | Path, reason: str, directory: str | Path) -> str:
    return (
        f"engine handle file {path}: the engine is not running ({reason}): a stale file "
        f"left by an engine that was killed; remove the file, or restart `qmath engine "
        f"serve --handle-dir {directory}`"
    )


def handle_files(directory: str | Path) -> list[Path]:
    """The handle files in ``directory``, sorted (temporary files are hidden and skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{HANDLE_PREFIX}*{HANDLE_SUFFIX}") if p.is_file())


def wait_for_handles(
    directory: str | Path,
    count: int,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    progress_s: float = 30.0,
    log: Callable[[str], None] = print,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[RemoteHandle]:
    """Wait until ``directory`` holds exactly ``count`` handle files, then parse them (in
    file-name order). A progress line every ``progress_s``; ValueError naming the directory
    and what was found when more than ``count`` appear, or fewer after ``timeout_s``, and
    naming the file when one was left by an engine that is not running (:func:`stale_reason`:
    its process is gone from this node; rank 0 would otherwise connect to nothing)."""
    start = clock()
    last_note = start
    while True:
        found = handle_files(directory)
        if len(found) > count:
            stale = [p.name for p in found if _stale(p)]
            which = f" ({', '.join(stale)} not running)" if stale else ""
            raise ValueError(
                f"{len(found)} engine handle files in {directory}, expected rl.engines={count}: "
                f"remove the stale ones{which} (an engine killed with SIGKILL leaves its file) "
                "or set rl.engines"
            )
        if len(found) == count:
            handles = [read_handle_file(p) for p in found]
            for path, handle in zip(found, handles, strict=True):
                reason = stale_reason(handle)
                if reason is not None:
                    raise ValueError(stale_message(path, reason, directory))
            return handles
        now = clock()
        if now - start >= timeout_s:
            stale = [p.name for p in found if _stale(p)]
            which = f", {', '.join(stale)} of an engine that is not running" if stale else ""
            raise ValueError(
                f"timed out after {timeout_s:.0f} s waiting for {count} engine handle files in "
                f"{directory}: found {len(found)}{which} (start them with `qmath engine serve "
                f"--handle-dir {directory}`; rl.engine_handles_timeout_s sets the wait)"
            )
        if now - last_note >= progress_s:
            log(
                f"waiting for engine handle files in {directory}: {len(found)} of {count} "
                f"after {now - start:.0f} s"
            )
            last_note = now
        sleep(poll_s)


def _stale(path: Path) -> bool:
    try:
        return stale_reason(read_handle_file(path)) is not None
    except ValueError:  # unreadable: reported when it is used
        return False


# ----------------------------------------------------------------------------- the command


def serve_backend(requested: str, on_gpu: bool) -> str:
    """``auto``: ``qmath_shm`` on CPU (the trainer's senders on this node), ``nccl`` on GPUs."""
    if requested not in SERVE_TRANSFERS:
        raise ValueError(f"--weight-transfer {requested}: one of {', '.join(SERVE_TRANSFERS)}")
    if requested == "auto":
        return "nccl" if on_gpu else "qmath_shm"
    if requested == "nccl" and not on_gpu:
        raise ValueError("--weight-transfer nccl needs GPUs; use qmath_shm (or auto) on CPU")
    return requested


def engine_kwargs(cfg: ServeConfig, on_gpu: bool) -> dict[str, Any]:
    """The engine's vLLM arguments: on CPU the defaults the GRPO trainer uses for its own
    engines (fp32, eager, a fixed KV-cache size)."""
    from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS

    if cfg.tensor_parallel_size < 1:
        raise ValueError("--tensor-parallel-size must be >= 1")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError("--gpu-memory-utilization must be in (0, 1]")
    if cfg.max_model_len is not None and cfg.max_model_len < 1:
        raise ValueError("--max-model-len must be >= 1")
    kwargs: dict[str, Any] = {"seed": cfg.seed}
    if on_gpu:
        kwargs.update(
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        if cfg.dtype:
            kwargs["dtype"] = cfg.dtype
    else:
        if cfg.tensor_parallel_size != 1:
            raise ValueError("--tensor-parallel-size > 1 needs GPUs")
        kwargs.update(CPU_VLLM_DEFAULTS)
        if cfg.dtype:
            kwargs["dtype"] = cfg.dtype
    if cfg.max_model_len:
        kwargs["max_model_len"] = cfg.max_model_len
    if cfg.skip_tokenizer_init:
        kwargs["skip_tokenizer_init"] = True
    return kwargs


class _Stop(Exception):
    pass


def _run(args: argparse.Namespace) -> int:
    import torch

    from qmath_megatron.inference.remote import RemoteEngine

    cfg = build_config(args)
    model = Path(cfg.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: no config.json (an HF model directory)")
    on_gpu = torch.cuda.is_available()
    backend = serve_backend(cfg.weight_transfer, on_gpu)
    kwargs = engine_kwargs(cfg, on_gpu)
    handle_dir = Path(cfg.handle_dir)
    handle_dir.mkdir(parents=True, exist_ok=True)

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def say(msg: str) -> None:
        print(f"qmath engine serve: {msg}", flush=True)

    say(f"starting a vLLM engine on {model} (weights by {backend}, listening on {cfg.host})")
    engine = path = None
    try:
        engine = RemoteEngine(model, weight_transfer=backend, host=cfg.host, **kwargs)
        path = handle_dir / handle_filename(engine.handle.host, engine.handle.port)
        write_handle_file(handle_dir, engine.handle)
        say(f"ready at {engine.handle.host}:{engine.handle.port}; handle file {path}")
        code = engine.process.wait()  # until a signal (or the server dies)
        say(f"the engine process exited with code {code}")
        return 1
    except _Stop as e:
        say(f"{e}: stopping")
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # clean up without a second interrupt
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if path is not None:
            path.unlink(missing_ok=True)
            say(f"removed {path}")
        if engine is not None:
            engine.close()
            say("engine stopped")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "engine",
        help="rollout engines outside the trainer (qmath engine serve)",
        description="Rollout engines that run outside the GRPO trainer.",
    )
    sub = p.add_subparsers(dest="engine_command", metavar="ACTION", required=True)
    s = sub.add_parser(
        "serve",
        help="start one vLLM engine and announce it in a handle file",
        description="Start one vLLM rollout engine; once it answers, write a handle file "
        "(engine-HOST-PORT.json, mode 0600) into --handle-dir for `qmath train grpo "
        "rl.placement=remote rl.engine_handles=DIR`. Runs until SIGTERM/SIGINT, which "
        "removes the handle file and stops the engine.",
    )
    a = ConfigArgs(s, ServeConfig)
    a.add("model", required=True, help="HF model directory the engine starts from")
    a.add("handle_dir", required=True, help="shared directory the handle file goes to")
    a.add(
        "host",
        help="address to listen on (0.0.0.0: every interface; the handle file then carries "
        "this node's routable address)",
    )
    a.add("weight_transfer", choices=SERVE_TRANSFERS, help="auto: qmath_shm on CPU, nccl on GPUs")
    a.add("tensor_parallel_size")
    a.add("gpu_memory_utilization")
    a.add("max_model_len")
    a.add("dtype", help="vLLM dtype (CPU default float32)")
    a.add("seed")
    a.add("skip_tokenizer_init", help="token ids only (a model directory without a tokenizer)")
    a.finish()
    s.set_defaults(func=_run)


if __name__ == "__main__":  # pragma: no cover - `qmath engine serve` is the entry point
    from qmath_megatron.cli import main

    sys.exit(main(["engine", "serve", *sys.argv[1:]]))

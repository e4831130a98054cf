"""A vLLM engine in its own process (the "remote" placement), reached over a local socket.

:class:`RemoteEngine` starts ``python -m qmath_megatron.inference.remote`` hosting a
:class:`~qmath_megatron.inference.engine.VLLMEngine` and speaks to it with
``multiprocessing.connection`` (pickled calls, an auth key). Its :attr:`~RemoteEngine.handle`
is picklable: a trainer rank in another process connects with ``handle.connect()`` and gets
the same interface: ``generate``, ``prompt_logprobs``, ``weight_version``,
``update_weights`` and the weight-transfer control plane (``start_weight_update``, ...),
so :mod:`qmath_megatron.rl.weight_sync` sends to it like to an in-process engine.

Weights cross the process boundary as safetensors files in /dev/shm (the ``qmath_shm``
backend): only file paths go over the socket. On GPUs the same server runs with
``weight_transfer="ipc"`` (an engine on the trainer's GPU: CUDA IPC handles go over the
socket) or ``"nccl"`` (an engine on other GPUs: the trainer broadcasts over an NCCL group
whose address the trainer picks; the handle carries the engine's ``host`` and its number
of ``workers``, which sizes the group). ``enable_sleep_mode=True`` (GPU) makes
``sleep(level)`` / ``wake_up(tags)`` work; on CPU they raise.

``qmath engine serve`` (:mod:`qmath_megatron.inference.serve`) runs one such server outside
any trainer and publishes its handle as a file (``RemoteHandle.node`` names its machine).

The server also keeps the engine out of the caller's process: an in-process vLLM engine
initialises ``torch.distributed`` and pins its threads, which a trainer process (or a
test session) must not have done to it.

An engine that dies mid-run (its process killed, its node gone: the connection is closed,
refused or reset) makes every call raise :class:`EngineGoneError`, one line (``qmath:
error:``) naming the engine (its index in the run, address, node and handle file) and how
to resume: the trainer's checkpoints are untouched by it (:func:`set_checkpoint_hint` names
the last one).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.inference.engine import Completion, Prompt, SamplingParams

_ALLOWED = {
    "generate",
    "prompt_logprobs",
    "weight_version",
    "init_weight_transfer_engine",
    "start_weight_update",
    "update_weights",
    "finish_weight_update",
    "fingerprint",
    "shutdown_weight_transfer_engine",
    "sleep",
    "wake_up",
}


CONNECT_TIMEOUT_S = 30.0  # a connection to an engine that is not there fails after this


class EngineGoneError(ChildProcessError, RuntimeError):
    """A rollout engine's process is gone (connection refused, reset or closed). A
    ChildProcessError, so the command line reports it in one line, without a traceback;
    a RuntimeError, as every other engine failure."""


# The run's last saved checkpoint (the trainer registers it: rl/engines.py), named by
# EngineGoneError's message.
_checkpoint_hint: Callable[[], str | None] | None = None


def set_checkpoint_hint(last_checkpoint: Callable[[], str | None] | None) -> None:
    """Register how to find this process's last saved checkpoint (None: forget it)."""
    global _checkpoint_hint
    _checkpoint_hint = last_checkpoint


@dataclass(frozen=True)
class RemoteHandle:
    """Where a remote engine listens; picklable, so it can be handed to trainer ranks."""

    host: str  # where the server listens (and the engine runs)
    port: int
    authkey: bytes
    model_dir: str
    backend: str | None
    bucket_bytes: int = 1 << 30
    workers: int = 1  # the engine's TP x PP x DP workers (an nccl group has 1 + workers)
    node: str | None = None  # the engine machine's host name (handle files of `qmath engine serve`)
    # Naming only (error messages): the engine's place in the run, the handle file it was
    # read from and the pid of its `qmath engine serve`.
    index: int | None = field(default=None, compare=False)
    handle_file: str | None = field(default=None, compare=False)
    pid: int | None = field(default=None, compare=False)

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> RemoteClient:
        return RemoteClient(self, timeout_s)

    def describe(self) -> str:
        """``rollout engine 1 at 10.0.0.5:4000 on n1 (handle file DIR/engine-....json)``."""
        who = "rollout engine" if self.index is None else f"rollout engine {self.index}"
        where = f"{self.host}:{self.port}" + (f" on {self.node}" if self.node else "")
        made = f" (handle file {self.handle_file})" if self.handle_file else ""
        return f"{who} at {where}{made}"

    def gone(self, reason: str, method: str | None = None) -> EngineGoneError:
        """The one-line error for this engine no longer answering."""
        during = f" during {method}" if method else ""
        if self.handle_file:
            restart = (
                "restart it (`qmath engine serve --handle-dir "
                f"{Path(self.handle_file).parent}`), then rerun"
            )
        else:
            restart = "rerun"
        last = _checkpoint_hint() if _checkpoint_hint is not None else None
        resume = f"the last one ({last})" if last else "the last one"
        return EngineGoneError(
            f"{self.describe()} is gone ({reason}){during}: its process ended or its node "
            f"is unreachable. The checkpoints saved so far are intact: {restart} the same "
            f"command to resume from {resume}"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "connection closed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.errno else exc.strerror
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def open_connection(host: str, port: int, authkey: bytes, timeout_s: float) -> Connection:
    """``multiprocessing.connection.Client((host, port), authkey=...)`` with a timeout on
    reaching the address (an engine node that is down fails in ``timeout_s``, not in the
    kernel's minutes of retries)."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.setblocking(True)
        conn = Connection(s.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    return conn


class RemoteClient:
    """The engine interface over one connection (calls are serialised by the server)."""

    def __init__(self, handle: RemoteHandle, timeout_s: float = CONNECT_TIMEOUT_S):
        """Connect; an engine that is not there raises :class:`EngineGoneError` (a wrong
        auth key: ``AuthenticationError``)."""
        self.handle = handle
        try:
            self._conn = open_connection(handle.host, handle.port, handle.authkey, timeout_s)
        except (OSError, EOFError) as e:
            raise handle.gone(f"does not answer: {_reason(e)}") from e
        self._tokenizer = None
        self._lock = threading.Lock()  # vLLM's nccl trainer engine calls from a thread
        self._transfer: Any = None  # TrainerTransfer of update_weights(named, version) (ipc)

    @property
    def backend(self) -> str | None:
        return self.handle.backend

    @property
    def bucket_bytes(self) -> int:
        return self.handle.bucket_bytes

    @property
    def host(self) -> str:
        return self.handle.host

    @property
    def workers(self) -> int:
        return self.handle.workers

    def _call(self, method: str, *args: Any) -> Any:
        try:
            with self._lock:
                self._conn.send((method, args))
                ok, value = self._conn.recv()
        except (OSError, EOFError) as e:  # the server is gone: closed, reset, refused
            raise self._gone(_reason(e), method) from e
        if not ok:
            raise RuntimeError(f"remote engine: {method} failed: {value}")
        return value

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.handle.model_dir, local_files_only=True
            )
        return self._tokenizer

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return self._call("generate", prompts, params)

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[float]]:
        return self._call("prompt_logprobs", [[int(t) for t in p] for p in prompts])

    def weight_version(self) -> int:
        return self._call("weight_version")

    def sleep(self, level: int = 1) -> None:
        self._call("sleep", level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self._call("wake_up", None if tags is None else list(tags))

    def fingerprint(self) -> float:
        return self._call("fingerprint")

    # the weight-transfer control plane (WeightSyncClient)
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, *args: Any) -> None:
        """``update_weights(update_info)`` (control plane: one chunk) or
        ``update_weights(named_tensors, version)`` (the engine protocol: a whole update)."""
        if len(args) == 1 and isinstance(args[0], dict):
            self._call("update_weights", args[0])
            return
        named_tensors, version = args
        self._update_all(named_tensors, version)

    def _update_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        from qmath_megatron.inference.engine import send_named

        if self.handle.backend not in ("qmath_shm", "ipc"):
            raise RuntimeError(
                f"whole-model updates from a client need the qmath_shm or ipc backend, not "
                f"{self.handle.backend}; nccl updates come from the trainer's weight transport"
            )
        send_named(self, self, named_tensors, version)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", weight_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self._call("shutdown_weight_transfer_engine")

    def _gone(self, reason: str, method: str) -> EngineGoneError:
        return self.handle.gone(reason, method)

    def close(self) -> None:
        self._conn.close()


class RemoteEngine(RemoteClient):
    """Starts the server process and is its first client; ``close()`` stops it."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        weight_transfer: str | None = "qmath_shm",
        bucket_bytes: int = 1 << 30,
        start_timeout_s: float = 600,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        **engine_kwargs: Any,
    ):
        """``host``: the address the server listens on, which trainer ranks on other
        nodes connect to (the default serves this node only). ``env``: extra environment
        of the engine process (e.g. ``CUDA_VISIBLE_DEVICES`` for an engine on other GPUs).
        ``engine_kwargs`` go to :class:`VLLMEngine` (``enable_sleep_mode``, ``seed``,
        ``tensor_parallel_size``, ``gpu_memory_utilization``, ...)."""
        authkey = secrets.token_bytes(16)
        spec = {
            "model_dir": str(model_dir),
            "weight_transfer": weight_transfer,
            "bucket_bytes": bucket_bytes,
            "host": host,
            "kwargs": engine_kwargs,
        }
        child_env = {**os.environ, **(env or {}), "QMATH_ENGINE_AUTHKEY": authkey.hex()}
        # The engine runs inside the server process (no further vLLM processes).
        child_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qmath_megatron.inference.remote", json.dumps(spec)],
            stdout=subprocess.PIPE,
            env=child_env,
            text=True,
        )
        port, workers = self._wait_ready(start_timeout_s)
        if host in ("0.0.0.0", ""):  # listening everywhere: hand out a routable address
            from qmath_megatron.inference.weight_transfer import address_towards

            host = address_towards("8.8.8.8")  # nothing is sent (UDP connect)
        import socket

        super().__init__(
            RemoteHandle(
                host,
                port,
                authkey,
                str(model_dir),
                weight_transfer,
                bucket_bytes,
                workers,
                socket.gethostname(),
            )
        )

    def _wait_ready(self, timeout_s: float) -> tuple[int, int]:
        result: list[str] = []
        ready = threading.Event()

        def read() -> None:
            # Keeps draining the server's stdout (vLLM logs there) so it never blocks on a
            # full pipe; its lines go to our stderr.
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if not ready.is_set() and line.startswith("QMATH_ENGINE_READY "):
                    result.append(line)
                    ready.set()
                    continue
                sys.stderr.write(line)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout_s)
        if not result:
            self.process.kill()
            code = self.process.wait()
            raise RuntimeError(
                f"the remote vLLM engine did not start (exit code {code}); its log is above"
            )
        _, port, workers = result[0].split()
        return int(port), int(workers)

    def _gone(self, reason: str, method: str) -> EngineGoneError:
        code = self.process.poll()
        if code is not None:
            reason += f"; its process exited with code {code}"
        return super()._gone(reason, method)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):  # already gone
            self._call("shutdown")
        super().close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(spec: dict[str, Any]) -> None:
    from qmath_megatron.inference.engine import VLLMEngine

    engine = VLLMEngine(
        spec["model_dir"],
        weight_transfer=spec["weight_transfer"],
        bucket_bytes=spec["bucket_bytes"],
        **spec["kwargs"],
    )
    authkey = bytes.fromhex(os.environ["QMATH_ENGINE_AUTHKEY"])
    listener = Listener((spec["host"], 0), authkey=authkey)
    lock = threading.Lock()  # one engine call at a time, whoever asks

    def handle(conn: Any) -> None:
        with conn:
            while True:
                try:
                    method, args = conn.recv()
                except (EOFError, OSError):
                    return
                if method == "shutdown":
                    conn.send((True, None))
                    # The main thread sits in accept(), and vLLM's in-process engine
                    # leaves non-daemon threads: nothing to clean up that exit skips.
                    sys.stdout.flush()
                    os._exit(0)
                if method not in _ALLOWED:
                    conn.send((False, f"unknown method {method!r}"))
                    continue
                try:
                    with lock:
                        if method in _CONTROL:
                            value = getattr(engine.client, method)(*args)
                        else:
                            value = getattr(engine, method)(*args)
                    conn.send((True, value))
                except Exception as e:  # the caller raises it with this text
                    conn.send((False, f"{type(e).__name__}: {e}"))

    parent = os.getppid()

    def orphan_watch() -> None:  # never outlive the process that started us
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(0)

    threading.Thread(target=orphan_watch, daemon=True).start()
    print(f"QMATH_ENGINE_READY {listener.address[1]} {engine.workers}", flush=True)
    accept_forever(listener, handle)


def accept_forever(listener: Listener, serve: Callable[[Any], None]) -> None:
    """Serve each connection in its own thread. A connection that fails its handshake (a
    port probe, a client with another key, a client that went away) is dropped: the
    engine keeps serving the others (an exception here would end the server)."""
    while True:
        try:
            conn = listener.accept()
        except OSError as e:
            if e.errno in (errno.EBADF, errno.EINVAL):  # the listener itself is closed
                raise
            continue
        except (EOFError, AuthenticationError):
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


_CONTROL = {
    "init_weight_transfer_engine",
    "start_weight_update",
    "update_weights",
    "finish_weight_update",
    "shutdown_weight_transfer_engine",
}


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))

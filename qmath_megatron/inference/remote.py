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
``weight_transfer="nccl"`` and the trainer broadcasts over NCCL instead.

The server also keeps the engine out of the caller's process: an in-process vLLM engine
initialises ``torch.distributed`` and pins its threads, which a trainer process (or a
test session) must not have done to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.inference.engine import Completion, Prompt, SamplingParams, buckets

_ALLOWED = {
    "generate", "prompt_logprobs", "weight_version", "init_weight_transfer_engine",
    "start_weight_update", "update_weights", "finish_weight_update", "fingerprint",
    "sleep", "wake_up",
}  # fmt: skip


@dataclass(frozen=True)
class RemoteHandle:
    """Where a remote engine listens; picklable, so it can be handed to trainer ranks."""

    host: str
    port: int
    authkey: bytes
    model_dir: str
    backend: str | None
    bucket_bytes: int = 1 << 30

    def connect(self) -> RemoteClient:
        return RemoteClient(self)


class RemoteClient:
    """The engine interface over one connection (calls are serialised by the server)."""

    def __init__(self, handle: RemoteHandle):
        self.handle = handle
        self._conn = Client((handle.host, handle.port), authkey=handle.authkey)
        self._tokenizer = None

    def _call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        ok, value = self._conn.recv()
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

    def sleep(self) -> None:
        self._call("sleep")

    def wake_up(self) -> None:
        self._call("wake_up")

    def fingerprint(self) -> float:
        return self._call("fingerprint")

    # the weight-transfer control plane (WeightSyncClient)
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("init_weight_transfer_engine", init_info)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, *args: Any) -> None:  # noqa: D401 - two call shapes, see below
        """``update_weights(update_info)`` (control plane: one chunk) or
        ``update_weights(named_tensors, version)`` (the engine protocol: a whole update)."""
        if len(args) == 1 and isinstance(args[0], dict):
            self._call("update_weights", args[0])
            return
        named_tensors, version = args
        self._update_all(named_tensors, version)

    def _update_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        from qmath_megatron.inference.weight_transfer import make_sender, send_all

        if self.handle.backend != "qmath_shm":
            raise RuntimeError("whole-model updates from here need the qmath_shm backend")
        send_all(self, make_sender("qmath_shm", self),
                 buckets(named_tensors, self.handle.bucket_bytes), version)  # fmt: skip

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", weight_version)

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
        **engine_kwargs: Any,
    ):
        authkey = secrets.token_bytes(16)
        spec = {"model_dir": str(model_dir), "weight_transfer": weight_transfer,
                "bucket_bytes": bucket_bytes, "kwargs": engine_kwargs}  # fmt: skip
        child_env = {**os.environ, **(env or {}), "QMATH_ENGINE_AUTHKEY": authkey.hex()}
        # The engine runs inside the server process (no further vLLM processes).
        child_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qmath_megatron.inference.remote", json.dumps(spec)],
            stdout=subprocess.PIPE, env=child_env, text=True,
        )  # fmt: skip
        port = self._wait_ready(start_timeout_s)
        super().__init__(RemoteHandle("127.0.0.1", port, authkey, str(model_dir),
                                      weight_transfer, bucket_bytes))  # fmt: skip

    def _wait_ready(self, timeout_s: float) -> int:
        result: list[str] = []
        ready = threading.Event()

        def read() -> None:
            # Keeps draining the server's stdout (vLLM logs there) so it never blocks on a
            # full pipe; its lines go to our stderr.
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if not ready.is_set() and line.startswith("QMATH_ENGINE_READY "):
                    result.append(line.split()[1])
                    ready.set()
                    continue
                sys.stderr.write(line)
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout_s)
        if not result:
            self.process.kill()
            code = self.process.wait()
            raise RuntimeError(f"the remote vLLM engine did not start (exit code {code}); "
                               "its log is above")  # fmt: skip
        return int(result[0])

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

    engine = VLLMEngine(spec["model_dir"], weight_transfer=spec["weight_transfer"],
                        bucket_bytes=spec["bucket_bytes"], **spec["kwargs"])  # fmt: skip
    authkey = bytes.fromhex(os.environ["QMATH_ENGINE_AUTHKEY"])
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
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
    print(f"QMATH_ENGINE_READY {listener.address[1]}", flush=True)
    while True:
        conn = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


_CONTROL = {"init_weight_transfer_engine", "start_weight_update", "update_weights",
            "finish_weight_update"}  # fmt: skip


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))

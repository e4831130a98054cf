"""Moving trainer weights into running vLLM engines through vLLM 0.32's weight-transfer API.

vLLM's API is a four-call handshake on the engine (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights(update_info)`` any number of times,
``finish_weight_update(weight_version)``) with a pluggable transport chosen by
``LLM(weight_transfer_config=WeightTransferConfig(backend=...))``:

- ``ipc`` (built in, GPU): colocated engines; ``update_info`` carries CUDA IPC handles.
- ``nccl`` (built in, GPU): remote engines; the trainer broadcasts over an NCCL group.

  Both are driven from the trainer by vLLM's own trainer-side engines
  (``IPCTrainerWeightTransferEngine`` / ``NCCLTrainerWeightTransferEngine``, wrapped by
  :class:`TrainerTransfer`), so the payloads are exactly what vLLM's worker side parses.
- ``qmath_shm`` (registered here, CPU and anywhere with a shared file system):
  ``update_info = {"path": FILE}``, a safetensors file the sender wrote (in /dev/shm by
  default), loaded by every engine worker. vLLM's built-in backends need an accelerator
  ("Cannot access accelerator device"), so this is what runs on CPU and in the tests.

Every backend loads through vLLM's layerwise reload (``initialize_layerwise_reload`` at
start, the model's own ``load_weights`` per chunk, ``finalize_layerwise_reload`` at finish):
calling ``load_weights`` on a running CPU engine without it fails half-way, because the
CPU path repacks linear weights after the first load.

Senders (:class:`BucketSender` implementations) turn a stream of buckets of
``(hf_name, full tensor)`` into ``update_weights`` calls on a :class:`WeightSyncClient`:
the object that reaches one engine (in-process, or in another process).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

SHM_BACKEND = "qmath_shm"
BACKENDS = ("qmath_shm", "ipc", "nccl")

Bucket = Sequence[tuple[str, torch.Tensor]]


class WeightSyncClient(Protocol):
    """What reaches one engine's weight-transfer control plane: the shape of vLLM's
    ``VLLMWeightSyncClient`` (plain dicts in, so it can cross a process boundary)."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


def default_shm_dir() -> Path:
    """/dev/shm when it exists (RAM-backed: no disk I/O), else the temp directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def bucket_nbytes(bucket: Bucket) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


def write_bucket(bucket: Bucket, directory: str | Path) -> Path:
    """Write one bucket as a safetensors file (atomically: readers never see a partial file).

    Tensors that share storage (the tied ``lm_head.weight`` is the embedding tensor
    itself) are copied: safetensors refuses shared storage.
    """
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in bucket:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice in one bucket")
        tensors[name] = t
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"qmath-weights-{uuid.uuid4().hex}.safetensors"
    tmp = final.with_suffix(".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------- engine side


def _make_shm_engine_class() -> type:
    """Build the vLLM worker-side backend class (imports vLLM only when asked for)."""
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class ShmInitInfo(WeightTransferInitInfo):
        pass

    @dataclass
    class ShmUpdateInfo(WeightTransferUpdateInfo):
        path: str

    class ShmWeightTransferEngine(WeightTransferEngine[ShmInitInfo, ShmUpdateInfo]):
        """Receives safetensors files by path; loads them with the layerwise reload."""

        init_info_cls = ShmInitInfo
        update_info_cls = ShmUpdateInfo

        def init_transfer_engine(self, init_info: ShmInitInfo) -> None:
            pass  # nothing to rendezvous: files are named in each update

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def receive_weights(self, update_info: ShmUpdateInfo) -> None:
            from safetensors import safe_open

            path = Path(update_info.path)
            if not path.is_file():
                raise FileNotFoundError(f"weight bucket file not found: {path}")
            with safe_open(str(path), framework="pt", device="cpu") as f:
                # keys(): a safe_open handle has no __iter__.
                weights = [(name, f.get_tensor(name)) for name in f.keys()]  # noqa: SIM118
            if self.device.type != "cpu":
                weights = [(n, t.to(self.device, non_blocking=True)) for n, t in weights]
            self.model.load_weights(weights)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # The base class ends with torch.accelerator.synchronize(), which raises on a
            # CPU-only machine ("Cannot access accelerator device"); nothing is async here.
            self.receive_weights(self.parse_update_info(update_info))

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def shutdown(self) -> None:
            pass

    return ShmWeightTransferEngine


def register_shm_backend() -> None:
    """Register ``qmath_shm`` with vLLM's factory (idempotent; run in every process that
    creates vLLM workers: :class:`QmathWorkerExtension` does it in spawned workers)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if SHM_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(SHM_BACKEND, _make_shm_engine_class())


class QmathWorkerExtension:
    """``LLM(worker_extension_cls=...)`` for engines in their own processes: importing this
    module registers the ``qmath_shm`` backend there; the methods take file paths, which
    cross process boundaries (tensors passed through ``collective_rpc`` arrive as lists)."""

    def qmath_weight_fingerprint(self) -> float:
        """Sum of all parameters: a cheap check that an update reached this worker."""
        model = self.model_runner.model  # type: ignore[attr-defined]
        return float(sum(p.detach().double().sum() for p in model.parameters()))


# ----------------------------------------------------------------------------- trainer side


class BucketSender(Protocol):
    """Sends buckets of HF-named full tensors to one engine (the sender rank calls it)."""

    def send(self, bucket: Bucket) -> None: ...


class ShmSender:
    """``qmath_shm``: one safetensors file per bucket, removed once the engine loaded it."""

    def __init__(self, client: WeightSyncClient, directory: str | Path | None = None):
        self.client = client
        self.directory = Path(directory) if directory is not None else default_shm_dir()

    def send(self, bucket: Bucket) -> None:
        path = write_bucket(bucket, self.directory)
        try:
            self.client.update_weights({"path": str(path)})
        finally:
            path.unlink(missing_ok=True)


# The built-in backends, driven by vLLM's own trainer-side engines
# (vllm/distributed/weight_transfer/{ipc_engine,nccl_engine}.py). They take a WeightSource
# at trainer_init and replay it every round in send_weights(): start_weight_update, the
# data plane, finish_weight_update. Every field below is checked against the vLLM 0.32
# source lines cited next to it.


class NotASenderClient:
    """The client of a non-sender trainer rank: vLLM's trainer engines hold a client on
    every rank but only call it on the sender (base.py TrainerWeightTransferEngine)."""

    def _refuse(self, *_: Any) -> None:
        raise RuntimeError("a non-sender trainer rank must not drive the engine")

    init_weight_transfer_engine = start_weight_update = update_weights = _refuse
    finish_weight_update = _refuse


class VersionedClient:
    """Passes ``version`` to ``finish_weight_update``: vLLM's trainer engines call
    ``client.finish_weight_update()`` without one (ipc_engine.py / nccl_engine.py
    ``send_weights``), and ``LLM.finish_weight_update(None)`` keeps the old version
    (entrypoints/rl/offline.py). Counts ``update_weights`` calls (chunks)."""

    def __init__(self, client: WeightSyncClient):
        self.client = client
        self.version: str | None = None
        self.updates = 0

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.init_weight_transfer_engine(init_info)

    def start_weight_update(self) -> None:
        self.client.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        self.updates += 1
        self.client.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.finish_weight_update(weight_version or self.version)


def make_source(
    metadata: Callable[[], list[tuple[str, torch.dtype, tuple[int, ...]]]] | None = None,
):
    """A vLLM ``WeightSource`` whose tensors come from ``source.producer()`` (set before
    each round: a fresh iterator of ``(hf_name, full tensor)`` per call, as
    ``WeightSource.__iter__`` requires). Bytes yielded are counted in ``source.nbytes``.

    ``metadata`` (needed by nccl only: the workers size their receive buffers from it,
    nccl_engine.py ``send_weights``) defaults to one pass over the producer, cached: the
    base class allows a source to learn its shapes by materialising once and caching
    (base.py ``WeightSource.metadata``). For the Megatron export that pass is a collective:
    vLLM calls ``metadata()`` on every trainer rank (nccl_engine.py ``send_weights``).
    """
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StreamSource(WeightSource):
        def __init__(self) -> None:
            self.producer: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None
            self.nbytes = 0
            self._meta: list[ParamMeta] | None = None

        def metadata(self) -> list[ParamMeta]:
            if self._meta is None:
                if metadata is not None:
                    self._meta = [ParamMeta(n, d, tuple(s)) for n, d, s in metadata()]
                else:
                    assert self.producer is not None
                    self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.producer()]
            return self._meta

        def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
            assert self.producer is not None, "set source.producer before a round"
            for name, tensor in self.producer():
                self.nbytes += tensor.numel() * tensor.element_size()
                yield name, tensor

    return StreamSource()


@dataclass(frozen=True)
class NCCLRendezvous:
    """Where the trainer's sender opens the NCCL group: it is rank 0 and hosts the
    TCPStore (distributed/utils.py ``StatelessProcessGroup.create``: rank 0 binds
    ``host:port``), the engine's workers join at ranks 1..workers (nccl_engine.py
    ``trainer_init``: ``rank_offset=1``; nccl_common.py ``worker_init_process_group``)."""

    master_address: str
    master_port: int
    world_size: int  # 1 trainer sender + the engine's TP x PP x DP workers


def address_towards(host: str) -> str:
    """This machine's address as seen from ``host`` (loopback for a local engine): the
    interface the kernel routes to it (a UDP connect sends nothing)."""
    import ipaddress
    import socket

    try:
        if ipaddress.ip_address(host).is_loopback:
            return "127.0.0.1"
    except ValueError:
        if host == "localhost":
            return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:  # no route: the host name's address is the best guess left
        return socket.gethostbyname(socket.gethostname())


def nccl_rendezvous(engine_host: str, workers: int, port: int | None = None) -> NCCLRendezvous:
    """A rendezvous for one engine with ``workers`` workers; a free local port unless
    given (vLLM's ``get_open_port``, as its own examples use)."""
    if workers < 1:
        raise ValueError(f"an engine has at least one worker, got {workers}")
    if port is None:
        from vllm.utils.network_utils import get_open_port

        port = get_open_port()
    return NCCLRendezvous(address_towards(engine_host), port, 1 + workers)


class TrainerTransfer:
    """The trainer side of one engine's ``ipc`` or ``nccl`` transfer: vLLM's own
    ``IPCTrainerWeightTransferEngine`` / ``NCCLTrainerWeightTransferEngine`` (packed, with
    ``buffer_bytes`` buffers) over a :func:`make_source` stream. Created on every trainer
    rank that takes part in the export (vLLM's ``trainer_init`` / ``send_weights`` run on
    every rank; only the sender, ``rank=0`` in its init info, calls the client).

    - ipc: ``trainer_init`` ships ``{"packed": True}`` to the engine (ipc_engine.py); each
      round packs the stream into one reusable GPU buffer of ``buffer_bytes`` (at least the
      largest tensor: packed_tensor.py ``packed_ipc_producer`` raises otherwise), ships one
      handle per chunk and waits for the engine to load it before refilling the buffer.
      The handles of all ranks of the default process group are merged per GPU UUID
      (``_all_gather_and_merge_handles``), so every rank of that group must send as often.
    - nccl: ``trainer_init`` runs the engine's ``init_weight_transfer_engine`` (which
      blocks until the trainer joins) in a thread while it opens rank 0 of the group
      (nccl_engine.py ``trainer_init``); each round ships the metadata in one
      ``update_weights`` running in a thread while it broadcasts packed buffers.
    """

    def __init__(
        self,
        backend: str,
        client: WeightSyncClient | None,
        *,
        is_sender: bool = True,
        buffer_bytes: int = 1 << 30,
        rendezvous: NCCLRendezvous | None = None,
        metadata: Callable[[], list[tuple[str, torch.dtype, tuple[int, ...]]]] | None = None,
    ):
        if backend not in ("ipc", "nccl"):
            raise ValueError(f"TrainerTransfer drives ipc or nccl, not {backend!r}")
        require_cuda(backend)
        if is_sender and client is None:
            raise ValueError("the sender needs the engine's client")
        self.backend = backend
        self.client = VersionedClient(client if client is not None else NotASenderClient())
        self.source = make_source(metadata)
        rank = 0 if is_sender else 1  # vLLM: rank 0 is the sender (base.py TrainerInitInfo)
        if backend == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import (
                IPCTrainerInitInfo,
                IPCTrainerWeightTransferEngine,
            )

            info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=buffer_bytes)
            self.engine = IPCTrainerWeightTransferEngine.trainer_init(
                info, client=self.client, source=self.source
            )
        else:
            from vllm.distributed.weight_transfer.nccl_engine import (
                NCCLTrainerInitInfo,
                NCCLTrainerWeightTransferEngine,
            )

            if is_sender and rendezvous is None:
                raise ValueError("the nccl sender needs a rendezvous (master address/port)")
            r = rendezvous or NCCLRendezvous("", 0, 0)  # non-senders join no NCCL group
            info = NCCLTrainerInitInfo(
                r.master_address,
                r.master_port,
                r.world_size,
                rank=rank,
                packed=True,
                packed_buffer_size_bytes=buffer_bytes,
            )
            self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=self.client, source=self.source
            )

    def send(
        self, producer: Callable[[], Iterable[tuple[str, torch.Tensor]]], version: int
    ) -> tuple[int, int]:
        """One full round (start, data, finish with ``version``); returns (bytes, chunks)."""
        self.source.producer = producer
        self.client.version = str(version)
        self.source.nbytes = self.client.updates = 0
        self.engine.send_weights()
        return self.source.nbytes, self.client.updates

    def shutdown(self) -> None:
        """Tear down both ends: the trainer's communicator, then (sender) the engine's
        (``LLM.shutdown_weight_transfer_engine``; the engine keeps serving)."""
        self.engine.shutdown()
        release = getattr(self.client.client, "shutdown_weight_transfer_engine", None)
        if self.engine.is_sender and release is not None:
            release()


def require_cuda(backend: str) -> None:
    """vLLM's ipc and nccl backends need CUDA on the trainer side too."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"the {backend} weight-transfer backend needs CUDA GPUs (vLLM's built-in ipc/nccl "
            "backends); on CPU use qmath_shm"
        )


def make_sender(backend: str, client: WeightSyncClient, **kwargs: Any) -> BucketSender:
    """The per-bucket sender of ``qmath_shm``; ipc and nccl send whole rounds through
    vLLM's trainer engines (:class:`TrainerTransfer`)."""
    if backend == SHM_BACKEND:
        return ShmSender(client, **kwargs)
    if backend in ("ipc", "nccl"):
        raise ValueError(f"{backend} sends whole rounds: use TrainerTransfer, not a bucket sender")
    raise ValueError(f"unknown weight-transfer backend {backend!r} ({', '.join(BACKENDS)})")


def send_all(
    client: WeightSyncClient, sender: BucketSender, buckets: Iterable[Bucket], version: int
) -> int:
    """One complete update: start, every bucket, finish with ``version``; returns bytes sent."""
    client.start_weight_update()
    sent = 0
    for bucket in buckets:
        sender.send(bucket)
        sent += bucket_nbytes(bucket)
    client.finish_weight_update(str(version))
    return sent

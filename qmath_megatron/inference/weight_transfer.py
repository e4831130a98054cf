"""Moving trainer weights into running vLLM engines through vLLM 0.32's weight-transfer API.

vLLM's API is a four-call handshake on the engine (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights(update_info)`` any number of times,
``finish_weight_update(weight_version)``) with a pluggable transport chosen by
``LLM(weight_transfer_config=WeightTransferConfig(backend=...))``:

- ``ipc`` (built in, GPU): colocated engines; ``update_info`` carries CUDA IPC handles.
- ``nccl`` (built in, GPU): remote engines; the trainer broadcasts over an NCCL group
  (driven by vLLM's own ``NCCLTrainerWeightTransferEngine``, see ``rl/weight_sync.py``).
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
from collections.abc import Iterable, Sequence
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


class IPCSender:
    """``ipc`` (vLLM built-in, GPU, colocated): CUDA IPC handles of the sender's full
    tensors, in vLLM's ``IPCWeightTransferUpdateInfo`` layout (unpacked). The engine's
    workers open the handles on their own GPU, so they must see the sender's GPU."""

    def __init__(self, client: WeightSyncClient):
        self.client = client
        self._refs: list[torch.Tensor] = []

    def send(self, bucket: Bucket) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        uid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        names, dtypes, shapes, handles = [], [], [], []
        for name, tensor in bucket:
            t = tensor.detach().contiguous()
            self._refs.append(t)  # reduce_tensor's handle does not keep the storage alive
            names.append(name)
            dtypes.append(str(t.dtype).split(".")[-1])
            shapes.append(list(t.shape))
            handles.append({uid: reduce_tensor(t)[1]})
        self.client.update_weights({"names": names, "dtype_names": dtypes, "shapes": shapes,
                                    "ipc_handles": handles})  # fmt: skip
        torch.cuda.synchronize()
        self._refs.clear()


def make_sender(backend: str, client: WeightSyncClient, **kwargs: Any) -> BucketSender:
    if backend == SHM_BACKEND:
        return ShmSender(client, **kwargs)
    if backend == "ipc":
        return IPCSender(client)
    if backend == "nccl":
        raise ValueError(
            "the nccl backend sends whole rounds through vLLM's NCCL trainer engine, not per "
            "bucket: use qmath_megatron.rl.weight_sync.NCCLRound"
        )
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

"""Megatron (TP/PP shards) -> vLLM engines (HF names), every RL step.

Every rank of a model replica iterates :func:`qmath_megatron.convert.export.iter_hf_buckets`
(the streaming export ``qmath convert mcore-to-hf`` also uses: TP all-gather, PP hand-off,
QKV / gate-up un-fused by the conversion mapping, vocab padding trimmed) in lockstep; one
rank per engine (TP rank 0 of pipeline stage 0 of the replica that owns the engine) sends
each bucket. ``lm_head.weight`` is always sent, also for tied models: vLLM's CPU LM head
keeps its own packed copy. A rank never holds more than one bucket beyond its own shards.

Engines are spread over data-parallel replicas (engine ``i`` belongs to replica
``i % dp_size``); a replica without an engine skips the export. The engine side receives
through vLLM's weight-transfer API (``start_weight_update`` / ``update_weights`` /
``finish_weight_update(version)``, prefix cache reset), see
:mod:`qmath_megatron.inference.weight_transfer`.

Backends (``backend=``):

- ``qmath_shm`` (CPU, tested): each bucket of :func:`~qmath_megatron.convert.export.
  iter_hf_buckets` is a safetensors file in /dev/shm that the engine loads.
- ``ipc`` (GPU, colocated engines) and ``nccl`` (GPU, remote engines): vLLM's own
  trainer-side engines (:class:`~qmath_megatron.inference.weight_transfer.TrainerTransfer`)
  stream :func:`~qmath_megatron.convert.export.iter_hf_tensors` (the generator under
  ``iter_hf_buckets``: vLLM packs it into its own buffers of ``bucket_bytes``, so the
  buckets are not built twice). Every rank of a replica runs the round (the export is a
  collective); its sender ships. nccl does the rendezvous here, at construction, from what
  the engine handles carry (``host``, ``workers``): the sender is rank 0 of a group of
  ``1 + workers`` ranks on a free local port. Written for GPUs, not run here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qmath_megatron.inference.weight_transfer import (
    BACKENDS,
    SHM_BACKEND,
    TrainerTransfer,
    WeightSyncClient,
    bucket_nbytes,
    make_sender,
    nccl_rendezvous,
    require_cuda,
)
from qmath_megatron.models.flavors import QwenFlavor


@dataclass(frozen=True)
class SyncStats:
    version: int
    sync_s: float  # wall time of the whole export + transfer on this rank
    bytes: int  # bytes of HF tensors sent to each engine (lm_head counted when tied)
    buckets: int
    engines: int  # engines this rank sent to (0 on non-sender ranks)


def connect(target: Any) -> WeightSyncClient:
    """The weight-transfer client of an engine: a remote handle (``.connect()``), an
    in-process engine (``.client``) or a client already."""
    if hasattr(target, "connect"):
        return target.connect()
    if hasattr(target, "client"):
        return target.client
    return target


def engine_host(target: Any) -> str:
    """Where an engine runs: a remote handle's ``host``; an in-process engine is local."""
    handle = getattr(target, "handle", target)
    return getattr(handle, "host", "127.0.0.1")


def engine_workers(target: Any) -> int:
    """The engine's TP x PP x DP workers (``RemoteHandle.workers``, ``VLLMEngine.workers``)."""
    handle = getattr(target, "handle", target)
    workers = getattr(handle, "workers", None)
    if workers is None:
        raise ValueError(f"cannot tell how many workers engine {target!r} has (nccl needs it)")
    return int(workers)


class StaleSampleError(ValueError):
    """A rollout sample was generated with weights older than the policy being trained."""


def check_versions(sample_versions: Sequence[int | None], expected: int) -> None:
    """Refuse samples not generated with weight version ``expected`` (on-policy GRPO:
    every rollout of a step comes from the weights synced at the start of that step)."""
    bad = [v for v in sample_versions if v != expected]
    if bad:
        raise StaleSampleError(
            f"{len(bad)} of {len(sample_versions)} rollout samples were generated with weight "
            f"version {bad[0]}, not the current {expected}: refusing stale samples"
        )


class WeightSync:
    """Pushes a live Megatron model's weights into its engines; ``sync()`` is a collective
    over the model-parallel group of each replica (every rank calls it every time)."""

    def __init__(
        self,
        chunks: Sequence[Any],
        flavor: QwenFlavor,
        padded_vocab: int,
        engines: Sequence[Any],
        *,
        backend: str = SHM_BACKEND,
        bucket_bytes: int = 1 << 30,
        dtype: torch.dtype | None = None,
        ranks: dict[str, int] | None = None,
    ):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if ranks is None:
            from qmath_megatron.parallel.runtime import parallel_ranks

            ranks = parallel_ranks()
        if backend not in BACKENDS:
            raise ValueError(f"unknown weight-transfer backend {backend!r} ({', '.join(BACKENDS)})")
        self.chunks, self.flavor, self.padded_vocab = chunks, flavor, padded_vocab
        self.bucket_bytes, self.dtype, self.backend = bucket_bytes, dtype, backend
        dp_rank, dp_size = ranks["dp_rank"], ranks["dp_size"]
        self.has_engines = any(i % dp_size == dp_rank for i in range(len(engines)))
        self.is_sender = ranks["tp_rank"] == 0 and ranks["pp_rank"] == 0
        mine = [e for i, e in enumerate(engines) if i % dp_size == dp_rank]
        self.clients = [connect(e) for e in mine] if self.is_sender else []
        self.senders: list[Any] = []
        self.transfers: list[TrainerTransfer] = []
        if backend == SHM_BACKEND:
            self.senders = [make_sender(backend, c) for c in self.clients]
            self.version = 0
            return
        require_cuda(backend)
        if backend == "ipc" and len(engines) % dp_size:
            # vLLM merges the IPC handles of every rank of the default process group
            # (ipc_engine.py _all_gather_and_merge_handles): all ranks must send as often.
            raise ValueError(
                f"ipc needs the same number of engines on every data-parallel replica: "
                f"{len(engines)} engines over {dp_size} replicas"
            )
        buffer_bytes = bucket_bytes
        if backend == "ipc":  # packed_ipc_producer refuses a tensor larger than its buffer
            buffer_bytes = max(bucket_bytes, self._largest_tensor_bytes())
        for i, engine in enumerate(mine):
            client = self.clients[i] if self.is_sender else None
            rendezvous = None
            if backend == "nccl" and self.is_sender:
                rendezvous = nccl_rendezvous(engine_host(engine), engine_workers(engine))
            self.transfers.append(
                TrainerTransfer(
                    backend,
                    client,
                    is_sender=self.is_sender,
                    buffer_bytes=buffer_bytes,
                    rendezvous=rendezvous,
                )
            )
        self.version = 0

    def _largest_tensor_bytes(self) -> int:
        """Bytes of the largest HF tensor (embedding / LM head or an MLP matrix)."""
        f = self.flavor
        itemsize = (self.dtype or next(iter(self.chunks[0].parameters())).dtype).itemsize
        # HF tensors are un-fused: q_proj has the most rows of the attention weights.
        rows = max(f.vocab_size, f.ffn_hidden_size, f.num_attention_heads * f.head_dim)
        return rows * f.hidden_size * itemsize

    def close(self) -> None:
        """Release the ipc/nccl transfers on both ends (nothing to release for qmath_shm);
        a new WeightSync can then rendezvous with the same engines."""
        for transfer in self.transfers:
            transfer.shutdown()
        self.transfers = []

    def sync(self, version: int | None = None) -> SyncStats:
        """Export and send the current weights; engines report ``version`` afterwards
        (default: one more than the last sync)."""
        from qmath_megatron.convert.export import iter_hf_buckets

        version = self.version + 1 if version is None else version
        start = time.perf_counter()
        nbytes = nbuckets = 0
        if self.transfers:
            from qmath_megatron.convert.export import iter_hf_tensors

            def produce() -> Any:
                return iter_hf_tensors(
                    self.chunks,
                    self.flavor,
                    self.padded_vocab,
                    include_lm_head=True,
                    dtype=self.dtype,
                )

            for transfer in self.transfers:  # one round per engine (each is a collective)
                sent, chunks = transfer.send(produce, version)
                nbytes, nbuckets = sent, nbuckets + chunks
        elif self.has_engines:
            for client in self.clients:
                client.start_weight_update()
            for bucket in iter_hf_buckets(
                self.chunks,
                self.flavor,
                self.padded_vocab,
                include_lm_head=True,
                dtype=self.dtype,
                bucket_bytes=self.bucket_bytes,
            ):
                for sender in self.senders:
                    sender.send(bucket)
                nbytes += bucket_nbytes(bucket)
                nbuckets += 1
                del bucket
            for client in self.clients:
                client.finish_weight_update(str(version))
        self.version = version
        return SyncStats(version, time.perf_counter() - start, nbytes, nbuckets, len(self.clients))

"""Megatron (TP/PP shards) -> vLLM engines (HF names), every RL step.

Every rank of a model replica iterates the streaming export of
:mod:`qmath_megatron.convert.export` (the one ``qmath convert mcore-to-hf`` also uses: TP
all-gather, PP hand-off, QKV / gate-up un-fused by the conversion mapping, vocab padding
trimmed) in lockstep; one rank per engine (TP rank 0 of pipeline stage 0 of the replica
that owns the engine) sends. ``lm_head.weight`` is always sent, also for tied models:
vLLM's CPU LM head keeps its own packed copy. A rank never holds more than one bucket
beyond its own shards.

Engines are spread over data-parallel replicas (engine ``i`` belongs to replica
``i % dp_size``); a replica without an engine skips the export. The engine side receives
through vLLM's weight-transfer API (``start_weight_update`` / ``update_weights`` /
``finish_weight_update(version)``, prefix cache reset), see
:mod:`qmath_megatron.inference.weight_transfer`.

One transport per weight-transfer backend, behind :class:`WeightTransport` and built by
name (:func:`build_transport`); each owns its set-up, buckets, sleep/wake handling and
shutdown:

- ``qmath_shm`` (:mod:`.shm`): safetensors files in /dev/shm (CPU, any placement);
- ``ipc`` (:mod:`.ipc`): CUDA IPC handles to colocated GPU engines;
- ``nccl`` (:mod:`.nccl`): NCCL broadcast to remote GPU engines.
"""

from qmath_megatron.rl.weight_sync.base import (
    SleepingEngines,
    StaleSampleError,
    SyncStats,
    WeightTransport,
    check_versions,
    connect,
)
from qmath_megatron.rl.weight_sync.factory import TRANSPORTS, build_transport, register_transport
from qmath_megatron.rl.weight_sync.ipc import IpcTransport
from qmath_megatron.rl.weight_sync.nccl import NcclTransport
from qmath_megatron.rl.weight_sync.shm import ShmTransport

__all__ = [
    "TRANSPORTS",
    "IpcTransport",
    "NcclTransport",
    "ShmTransport",
    "SleepingEngines",
    "StaleSampleError",
    "SyncStats",
    "WeightTransport",
    "build_transport",
    "check_versions",
    "connect",
    "register_transport",
]

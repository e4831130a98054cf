"""``nccl``: remote engines (on GPUs the trainer does not use, on any node) receive the
sender's packed buffers by NCCL broadcast. The sender sets up the rendezvous itself from
what the engine handles carry (``host``, ``workers``): it is rank 0 of a group of
``1 + workers`` ranks on a free local port."""

from __future__ import annotations

from typing import Any

from qmath_megatron.inference.weight_transfer import NCCLRendezvous, nccl_rendezvous
from qmath_megatron.rl.weight_sync.factory import register_transport
from qmath_megatron.rl.weight_sync.rounds import VllmRoundTransport


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


@register_transport("nccl")
class NcclTransport(VllmRoundTransport):
    """vLLM's ``NCCLTrainerWeightTransferEngine`` per engine; the group is opened at
    construction (the engine's ``init_weight_transfer_engine`` joins it). The engines never
    sleep: NCCL refuses two ranks of a group on one GPU, so they are never colocated."""

    def check_engines(self) -> None:
        if self.engines_sleep:
            raise ValueError(
                "nccl reaches engines on other GPUs than the trainer's (NCCL refuses two "
                "ranks on one GPU): they do not sleep while the trainer steps"
            )

    def rendezvous(self, engine: Any) -> NCCLRendezvous:
        return nccl_rendezvous(engine_host(engine), engine_workers(engine))

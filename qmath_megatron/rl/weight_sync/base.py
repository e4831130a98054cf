"""The interface of a weight transport (:class:`WeightTransport`) and what every transport
shares: which engines a rank serves, the sleep/wake cycle of colocated engines around a
sync, the sync statistics and the version rules of the rollouts."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.distributed as dist

from qmath_megatron.inference.weight_transfer import WeightSyncClient
from qmath_megatron.models.flavors import QwenFlavor
from qmath_megatron.parallel.runtime import parallel_ranks

MIB = 1 << 20


@dataclass(frozen=True)
class SyncStats:
    version: int
    sync_s: float  # wall time of the whole export + transfer on this rank
    bytes: int  # bytes of HF tensors sent to each engine (lm_head counted when tied)
    buckets: int
    engines: int  # engines this rank sent to (0 on non-sender ranks)


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


def connect(target: Any) -> WeightSyncClient:
    """The weight-transfer client of an engine: a remote handle (``.connect()``), an
    in-process engine (``.client``) or a client already."""
    if hasattr(target, "connect"):
        return target.connect()
    if hasattr(target, "client"):
        return target.client
    return target


class SleepingEngines(Protocol):
    """Engines that can free their GPU memory between rollouts: the rollout engines of
    global rank 0 (:class:`~qmath_megatron.rl.engines.RolloutEngines`) or one engine's
    client."""

    def wake_up(self, tags: list[str] | None = None) -> None: ...

    def sleep(self, level: int = 1) -> None: ...


class WeightTransport(ABC):
    """Pushes a live Megatron model's weights into its rollout engines.

    ``engines``: every engine of the run (handles, clients or in-process engines), in
    order; engine ``i`` belongs to data-parallel replica ``i % dp_size`` and is sent to by
    that replica's TP rank 0 of pipeline stage 0. ``bucket_mb``: the bucket size
    (``rl.bucket_mb``), turned into bytes where the transport hands it on. ``dtype``: the
    dtype of the sent tensors (default: the parameters'). ``ranks``: this rank's
    coordinates (default: Megatron's parallel state).

    ``engines_sleep``: the engines share the trainer's GPUs and sleep while it steps
    (colocated placement on GPUs). ``sleeper``: what wakes them and puts them to sleep
    (global rank 0's engines; None on the other ranks). A step then runs
    :meth:`sync` (the weights woken first), :meth:`prepare_for_generation` (the KV cache
    back), the rollout and :meth:`finish_generation` (asleep again); ``sleep_wake_s``
    adds up the time spent waking and sleeping since the last sync.

    :meth:`sync` is a collective over the model-parallel group of each replica (over
    every rank when the engines sleep): every rank calls it every time. :meth:`close`
    releases what the set-up built, on both ends.
    """

    name: ClassVar[str]

    def __init__(
        self,
        chunks: Sequence[Any],
        flavor: QwenFlavor,
        padded_vocab: int,
        engines: Sequence[Any],
        *,
        bucket_mb: float = 1024,
        dtype: torch.dtype | None = None,
        ranks: dict[str, int] | None = None,
        engines_sleep: bool = False,
        sleeper: SleepingEngines | None = None,
    ):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        if ranks is None:
            ranks = parallel_ranks()
        self.chunks, self.flavor, self.padded_vocab = chunks, flavor, padded_vocab
        self.bucket_mb, self.dtype = bucket_mb, dtype
        self.dp_size = ranks["dp_size"]
        self.engines = [e for i, e in enumerate(engines) if i % self.dp_size == ranks["dp_rank"]]
        self.total_engines = len(engines)
        self.has_engines = bool(self.engines)
        self.is_sender = ranks["tp_rank"] == 0 and ranks["pp_rank"] == 0
        self.clients = [connect(e) for e in self.engines] if self.is_sender else []
        self.engines_sleep, self.sleeper = engines_sleep, sleeper
        self.sleep_wake_s = 0.0
        self.version = 0

    @abstractmethod
    def send(self, version: int) -> tuple[int, int]:
        """Export the current weights and send them to this rank's engines, which report
        ``version`` afterwards; returns (bytes sent to each engine, buckets or chunks)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the set-up built, on both ends."""

    def sync(self, version: int | None = None) -> SyncStats:
        """Export and send the current weights; engines report ``version`` afterwards
        (default: one more than the last sync). Sleeping engines wake their weights first
        (the sync overwrites them in place) and every rank waits for that."""
        version = self.version + 1 if version is None else version
        self.sleep_wake_s = 0.0
        if self.engines_sleep:
            self._sleep_wake(lambda engines: engines.wake_up(["weights"]))
            dist.barrier()  # every sender's engine is awake
        start = time.perf_counter()
        nbytes, nbuckets = self.send(version)
        self.version = version
        return SyncStats(version, time.perf_counter() - start, nbytes, nbuckets, len(self.clients))

    def prepare_for_generation(self) -> None:
        """After the sync, before the rollout: sleeping engines get their KV cache back."""
        if self.engines_sleep:
            self._sleep_wake(lambda engines: engines.wake_up(["kv_cache"]))

    def finish_generation(self) -> None:
        """After the rollout: sleeping engines free their GPU memory for the trainer's
        forward and backward (level 1: weights offloaded to host memory, KV cache dropped)."""
        if self.engines_sleep:
            self._sleep_wake(lambda engines: engines.sleep(level=1))

    def _sleep_wake(self, call: Callable[[SleepingEngines], None]) -> None:
        if self.sleeper is not None:
            start = time.perf_counter()
            call(self.sleeper)
            self.sleep_wake_s += time.perf_counter() - start

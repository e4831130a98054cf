"""``qmath_shm``: every bucket of the streaming export is a safetensors file (in /dev/shm:
RAM-backed) that each engine worker loads. Runs on CPU, and anywhere the sender and its
engines share a file system (so each engine's sender must be on the engine's node)."""

from __future__ import annotations

from typing import Any

from qmath_megatron.convert.export import iter_hf_buckets
from qmath_megatron.inference.weight_transfer import SHM_BACKEND, ShmSender, bucket_nbytes
from qmath_megatron.rl.weight_sync.base import MIB, WeightTransport
from qmath_megatron.rl.weight_sync.factory import register_transport


@register_transport(SHM_BACKEND)
class ShmTransport(WeightTransport):
    """Buckets of at most ``bucket_mb`` MiB (a larger tensor is a bucket of its own), one
    file per bucket and engine of this rank, removed once the engine loaded it. Every rank
    of a replica with engines iterates the export (a collective); its sender writes the
    files."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.senders = [ShmSender(c) for c in self.clients]

    def send(self, version: int) -> tuple[int, int]:
        if not self.has_engines:
            return 0, 0
        for client in self.clients:
            client.start_weight_update()
        nbytes = nbuckets = 0
        for bucket in iter_hf_buckets(
            self.chunks,
            self.flavor,
            self.padded_vocab,
            include_lm_head=True,
            dtype=self.dtype,
            bucket_bytes=int(self.bucket_mb * MIB),
        ):
            for sender in self.senders:
                sender.send(bucket)
            nbytes += bucket_nbytes(bucket)
            nbuckets += 1
            del bucket  # hold one bucket at a time
        for client in self.clients:
            client.finish_weight_update(str(version))
        return nbytes, nbuckets

    def close(self) -> None:
        """Nothing to release: each file is removed once its engine loaded it."""

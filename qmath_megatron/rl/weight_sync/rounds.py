"""What the ``ipc`` and ``nccl`` transports share: vLLM's own trainer-side engines
(:class:`~qmath_megatron.inference.weight_transfer.TrainerTransfer`, one per engine of this
rank) stream :func:`~qmath_megatron.convert.export.iter_hf_tensors` (the generator under
``iter_hf_buckets``: vLLM packs it into its own buffers, so the buckets are not built
twice). Every rank of a replica runs each round (the export is a collective); its sender
ships."""

from __future__ import annotations

from typing import Any

from qmath_megatron.convert.export import iter_hf_tensors
from qmath_megatron.inference.weight_transfer import NCCLRendezvous, TrainerTransfer, require_cuda
from qmath_megatron.rl.weight_sync.base import MIB, WeightTransport


class VllmRoundTransport(WeightTransport):
    """A transfer per engine of this rank, built at construction (the subclass says how
    large vLLM's packed buffers are and where an engine's rendezvous is) and shut down on
    both ends by :meth:`close`."""

    def __init__(self, *args: Any, **kwargs: Any):
        require_cuda(self.name)  # before anything reaches an engine
        super().__init__(*args, **kwargs)
        self.check_engines()
        buffer_bytes = self.buffer_bytes()
        self.transfers = [
            TrainerTransfer(
                self.name,
                self.clients[i] if self.is_sender else None,
                is_sender=self.is_sender,
                buffer_bytes=buffer_bytes,
                rendezvous=self.rendezvous(engine) if self.is_sender else None,
            )
            for i, engine in enumerate(self.engines)
        ]

    def check_engines(self) -> None:
        """Refuse engines this transport cannot reach (before any transfer is set up)."""

    def buffer_bytes(self) -> int:
        """vLLM's packed buffer: one bucket (``bucket_mb``)."""
        return int(self.bucket_mb * MIB)

    def rendezvous(self, engine: Any) -> NCCLRendezvous | None:
        """Where the sender meets ``engine``'s workers (None: no group to open)."""
        return None

    def send(self, version: int) -> tuple[int, int]:
        def produce() -> Any:
            return iter_hf_tensors(
                self.chunks, self.flavor, self.padded_vocab, include_lm_head=True, dtype=self.dtype
            )

        nbytes = nchunks = 0
        for transfer in self.transfers:  # one round per engine (each is a collective)
            sent, chunks = transfer.send(produce, version)
            nbytes, nchunks = sent, nchunks + chunks
        return nbytes, nchunks

    def close(self) -> None:
        """Release the transfers on both ends; a new transport can then set up with the
        same engines."""
        for transfer in self.transfers:
            transfer.shutdown()
        self.transfers = []

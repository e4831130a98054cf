"""``ipc``: colocated engines (on the trainer's own GPUs) receive CUDA IPC handles of the
sender's packed GPU buffer, one chunk at a time."""

from __future__ import annotations

from qmath_megatron.rl.weight_sync.factory import register_transport
from qmath_megatron.rl.weight_sync.rounds import VllmRoundTransport


@register_transport("ipc")
class IpcTransport(VllmRoundTransport):
    """vLLM's ``IPCTrainerWeightTransferEngine`` per engine. The engines sit on their
    senders' GPUs, so in a run they are the colocated ones that sleep while the trainer
    steps (``engines_sleep``)."""

    def check_engines(self) -> None:
        if self.total_engines % self.dp_size:
            # vLLM merges the IPC handles of every rank of the default process group
            # (ipc_engine.py _all_gather_and_merge_handles): all ranks must send as often.
            raise ValueError(
                f"ipc needs the same number of engines on every data-parallel replica: "
                f"{self.total_engines} engines over {self.dp_size} replicas"
            )

    def buffer_bytes(self) -> int:
        # packed_ipc_producer refuses a tensor larger than its buffer.
        return max(super().buffer_bytes(), self.largest_tensor_bytes())

    def largest_tensor_bytes(self) -> int:
        """Bytes of the largest HF tensor (embedding / LM head or an MLP matrix)."""
        f = self.flavor
        itemsize = (self.dtype or next(iter(self.chunks[0].parameters())).dtype).itemsize
        # HF tensors are un-fused: q_proj has the most rows of the attention weights.
        rows = max(f.vocab_size, f.ffn_hidden_size, f.num_attention_heads * f.head_dim)
        return rows * f.hidden_size * itemsize

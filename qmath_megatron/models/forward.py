"""Forward passes through Megatron's pipeline schedules, for evaluation and verification."""

from __future__ import annotations

import torch

from qmath_megatron.parallel.schedule import run_schedule


def forward_logits(
    chunks: list, tokens: torch.Tensor, num_microbatches: int = 1
) -> torch.Tensor | None:
    """Full-vocabulary logits ``[batch, seq, padded_vocab]`` of a (TP/PP/VPP) model.

    Runs Megatron's forward-only pipeline schedule; the logits of the last pipeline stage
    are gathered across tensor-parallel ranks. Returns ``None`` on ranks that are not in
    the last pipeline stage. ``tokens``: ``[batch, seq]`` int64, the same on every rank.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    batch, seq = tokens.shape
    if batch % num_microbatches:
        raise ValueError(f"batch {batch} is not divisible into {num_microbatches} microbatches")
    micro = batch // num_microbatches
    device = next(chunks[0].parameters()).device
    tokens = tokens.to(device)
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(micro, seq)
    microbatches = [
        {"tokens": mb, "position_ids": position_ids} for mb in torch.split(tokens, micro)
    ]

    def step(mb, model):
        output = model(mb["tokens"], mb["position_ids"], None)

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor).detach()

        return output, collect

    # The same schedule call as training and evaluation (one code path).
    outputs = run_schedule(
        chunks, step, microbatches, forward_only=True, collect_non_loss_data=True
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(outputs, dim=0)

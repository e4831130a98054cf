"""Per-token log-probs and entropies of a (tensor-parallel) Megatron GPT model: what a
policy-gradient loss needs from the model, computed on the vocab-parallel logits without
gathering the full vocabulary.

Log-probs are normalised over the real vocabulary: the Megatron embedding has TP padding
rows that the HF model (and so an inference engine) does not have, so their logits are
masked out.
"""

from __future__ import annotations

from typing import Any

import torch

from qmath_megatron.models.builder import unwrap

_NEG = -1e30  # "minus infinity" for padded vocabulary columns (exp -> 0, no inf * 0)


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), entropy)``, both ``[b, s]``, from vocab-parallel logits
    ``[b, s, V_padded / tp]`` (this TP rank's slice); padded columns are excluded. The
    log-probs carry gradients (Megatron's vocab-parallel cross entropy); the entropy does not.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    cols = torch.arange(start, start + part, device=logits.device)
    logits = logits.float().masked_fill(cols >= vocab_size, _NEG)
    with torch.no_grad():  # before the cross entropy, which works in place on its input
        group = ps.get_tensor_model_parallel_group()
        gmax = logits.max(-1).values
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax[..., None]
        e = shifted.exp()
        sums = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
        dist.all_reduce(sums, group=group)
        entropy = sums[0].log() - sums[1] / sums[0]
    logp = -vocab_parallel_cross_entropy(logits, labels)
    return logp, entropy


def logprobs_forward(model: Any, batch: dict, vocab_size: int) -> torch.Tensor:
    """One model chunk's forward of a microbatch (``tokens``, ``position_ids``, ``labels``
    ``[b, s]``): on the last pipeline stage ``[b, s, 2]`` (log p(labels), entropy), on the
    others the hidden states the schedule passes on."""
    output = model(batch["tokens"], batch["position_ids"], None)
    if unwrap(model).post_process:
        logp, entropy = vocab_parallel_logprobs(output, batch["labels"], vocab_size)
        output = torch.stack([logp, entropy.to(logp.dtype)], dim=-1)
    return output

"""One optimizer step on Megatron-Core: DDP-wrapped model chunks, the pipeline schedule,
Megatron's (distributed) optimizer. The training loop (``qmath train``) calls this; the
TP/PP equivalence tests call it directly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.precision import PrecisionConfig


@dataclass
class StepResult:
    loss: float  # token-weighted mean LM loss over the global batch
    grad_norm: float  # before clipping; nan if the step was skipped
    tokens: int  # loss tokens in the global batch
    update_successful: bool


def wrap_ddp(chunks: list, optim: OptimConfig) -> list:
    """Wrap model chunks in Megatron's DistributedDataParallel (contiguous grad buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=optim.overlap_grad_reduce and torch.cuda.is_available(),
        overlap_param_gather=optim.overlap_param_gather and torch.cuda.is_available(),
        use_distributed_optimizer=optim.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # handled by the loop: skip/stop with a clear message
        bucket_size=None,
    )
    return [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=(i > 0),  # as Megatron-LM: only the first chunk's buckets overlap
        )
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(ddp_chunks: list, optim: OptimConfig, precision: PrecisionConfig):
    """Megatron optimizer (AdamW, fp32 master weights for bf16) over the DDP chunks."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype=precision.torch_dtype,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    model_config = ddp_chunks[0].config
    model_config.finalize_model_grads_func = finalize_model_grads
    model_config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in ddp_chunks]
    model_config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return optimizer


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked LM loss for Megatron's schedule: ``(sum, tokens, {"lm loss": [sum, tokens]})``.

    ``output_tensor``: per-token losses ``[batch, seq]`` from ``GPTModel(labels=...)``;
    ``loss_mask``: ``[batch, seq]`` float, 1 where the token counts. The schedule divides the
    sum by the token count of the microbatch (``calculate_per_token_loss=False``).
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}


def _forward_step(data_iterator: Iterator[dict], model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(lm_loss, batch["loss_mask"])


def train_step(
    ddp_chunks: list,
    optimizer,
    microbatches: list[dict],
    seq_length: int,
    *,
    skip_nonfinite: bool = True,
) -> StepResult:
    """Forward/backward over ``microbatches`` (this DP rank's share) and one optimizer step.

    Each microbatch is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    ``[micro_batch, seq]`` (and optionally ``attention_mask``), the same on all TP/PP ranks.
    With ``skip_nonfinite``, a step whose loss or gradient norm is NaN/inf does not update
    the weights (``update_successful=False``); every rank takes the same decision.
    """
    import math

    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    iterators = [iter(microbatches) for _ in ddp_chunks]
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterators if len(ddp_chunks) > 1 else iterators[0],
        model=ddp_chunks if len(ddp_chunks) > 1 else ddp_chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=False,
    )

    # Loss for logging and the finiteness check: token-weighted over microbatches and DP
    # ranks, broadcast from the last pipeline stage so every rank sees the same value.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in reduced:
            totals += item["lm loss"].double().to(device)
        # With context parallelism each CP rank holds part of every sequence's tokens.
        dist.all_reduce(
            totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(totals, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    loss = (totals[0] / totals[1].clamp(min=1)).item()

    # Megatron's optimizer.step(), split so that a non-finite step can be skipped.
    found_inf = optimizer.prepare_grads()
    clip = optimizer.config.clip_grad
    grad_norm = float(optimizer.clip_grad_norm(clip if clip > 0 else float("inf")))
    finite = not found_inf and math.isfinite(loss) and math.isfinite(grad_norm)
    update_successful = False
    if finite or not skip_nonfinite:
        update_successful = bool(optimizer.step_with_ready_grads())
    return StepResult(
        loss=loss,
        grad_norm=grad_norm,
        tokens=int(totals[1].item()),
        update_successful=update_successful and finite,
    )


def lm_microbatch(sequences: torch.Tensor, loss_mask: torch.Tensor | None = None) -> dict:
    """Next-token microbatch from ``[batch, seq + 1]`` token ids: inputs, shifted labels,
    a loss mask (all ones unless given, ``[batch, seq]``) and position ids."""
    tokens = sequences[:, :-1].contiguous()
    labels = sequences[:, 1:].contiguous()
    batch, seq = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(batch, seq) if loss_mask is None else loss_mask.float(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous(),
    }

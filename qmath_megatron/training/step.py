"""One optimizer step on Megatron-Core: DDP-wrapped model chunks, the pipeline schedule,
Megatron's (distributed) optimizer. The training loop (``qmath train``) calls this; the
TP/PP equivalence tests call it directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.parallel.schedule import (
    ForwardStep,
    reduce_reports,
    report_means,
    run_schedule,
)


@dataclass
class StepResult:
    loss: float  # token-weighted mean LM loss over the global batch
    grad_norm: float  # before clipping; nan if the step was skipped
    tokens: int  # loss tokens in the global batch
    update_successful: bool
    reports: dict[str, float] = field(default_factory=dict)  # mean of every report entry


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
    ``loss_mask``: ``[batch, seq]`` float, 1 where the token counts. With
    ``calculate_per_token_loss=False`` (pretraining) the schedule divides the sum by the
    microbatch's token count; with True (SFT) the gradient is of the global-batch
    token mean (see :mod:`qmath_megatron.parallel.schedule`).
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss_sum, tokens, {"lm loss": torch.stack([loss_sum.detach(), tokens.float()])}


def lm_forward_step(batch: dict, model):
    """GPT language-model forward step: per-token losses of ``labels``, masked by
    ``loss_mask``; ``attention_mask`` and ``packed_seq_params`` are passed when present."""
    kwargs = {}
    if batch.get("packed_seq_params") is not None:
        kwargs["packed_seq_params"] = batch["packed_seq_params"]
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
        **kwargs,
    )
    return output, partial(lm_loss, batch["loss_mask"])


def train_step(
    ddp_chunks: list,
    optimizer,
    microbatches: list[dict],
    seq_length: int | None = None,
    *,
    forward_step: ForwardStep = lm_forward_step,
    loss_key: str = "lm loss",
    skip_nonfinite: bool = True,
) -> StepResult:
    """Forward/backward over ``microbatches`` (this DP rank's share) and one optimizer step.

    Each microbatch is a dict of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    ``[micro_batch, seq]`` (and optionally ``attention_mask``), the same on all TP/PP ranks
    (CP slicing happens in :func:`run_schedule`). ``forward_step`` is the task's (default:
    the LM loss); ``loss_key`` names the report entry logged as ``loss``. With
    ``skip_nonfinite``, a step whose loss or gradient norm is NaN/inf does not update the
    weights (``update_successful=False``); every rank takes the same decision.
    """
    import math

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(
        ddp_chunks, forward_step, microbatches, forward_only=False, seq_length=seq_length
    )
    # Loss for logging and the finiteness check: the same on every rank.
    reduced = reduce_reports(reports)
    total, tokens = reduced.get(loss_key, (0.0, 0.0))
    loss = total / max(tokens, 1.0)

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
        tokens=int(tokens),
        update_successful=update_successful and finite,
        reports=report_means(reduced),
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

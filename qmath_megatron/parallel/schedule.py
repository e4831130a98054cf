"""The one pipeline-schedule call and the one loss reduction every stage uses.

:func:`run_schedule` runs Megatron's forward(-backward) schedule (no pipelining, 1F1B or
interleaved, chosen by Megatron from the parallel state) over a list of microbatches;
training steps, evaluation, the verify forward and GRPO's forward-only log-prob passes
all call it. It slices every microbatch for context parallelism first, so no caller can
forget to (the bug behind a wrong validation loss at ``cp=2``).

:func:`reduce_reports` turns the per-microbatch ``{name: [sum, count]}`` reports that loss
functions return into global means: summed over microbatches, all-reduced over the data-
and context-parallel ranks (each CP rank holds part of every sequence's tokens), and
broadcast from the last pipeline stage so every rank returns the same numbers.

Loss-function contract (Megatron's three-value form): ``loss_func(output_tensor)`` returns
``(loss_sum, count, report)`` where ``loss_sum`` is the differentiable sum of per-item
losses of the microbatch, ``count`` the number of items it sums over (int tensor: loss
tokens, or groups for a reward model) and ``report`` a dict ``name -> tensor([sum, count])``
(detached) for logging. Whether the gradient is that of the global mean (sum over all
microbatches and ranks / global count) or of the mean of per-microbatch means is the
model config's ``calculate_per_token_loss`` (see :class:`qmath_megatron.training.task.Task`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# The batch keys that are laid out [batch, seq, ...] and must be cut for context
# parallelism; any other tensor whose first two dimensions equal ``tokens``' is cut too.
# ``attention_mask`` is [batch, 1, seq, seq] (cut along the query dimension 2).
_SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")

ForwardStep = Callable[[dict, Any], tuple[torch.Tensor, Callable]]


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def cp_slice(batch: dict[str, Any]) -> dict[str, Any]:
    """This context-parallel rank's share of a microbatch (identity at CP=1).

    Megatron's load-balanced split (sequence in 2*CP chunks; rank r keeps chunks r and
    2*CP-1-r) applied to ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, the dense
    ``attention_mask`` and any other tensor shaped ``[batch, seq, ...]`` like ``tokens``;
    other entries (``cu_seqlens``, scalars, lists) pass through unchanged.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_batch_on_this_cp_rank

    if ps.get_context_parallel_world_size() == 1:
        return batch
    shape = tuple(batch["tokens"].shape[:2])
    if shape[1] % (2 * ps.get_context_parallel_world_size()):
        raise ValueError(
            f"sequence length {shape[1]} is not divisible by 2 x CP "
            f"({2 * ps.get_context_parallel_world_size()}) for context parallelism"
        )
    per_token = {
        k: v
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
        and (k in _SEQUENCE_KEYS or k == "attention_mask" or tuple(v.shape[:2]) == shape)
    }
    return {**batch, **get_batch_on_this_cp_rank(per_token)}


def _to_device(batch: dict[str, Any]) -> dict[str, Any]:
    """Tensors of a microbatch onto this rank's device (data loaders build them on CPU)."""
    if not torch.cuda.is_available():
        return batch
    device = _device()
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def run_schedule(
    chunks: list,
    forward_step: ForwardStep,
    microbatches: Sequence[dict[str, Any]],
    *,
    forward_only: bool,
    collect_non_loss_data: bool = False,
    seq_length: int | None = None,
) -> list:
    """Run Megatron's pipeline schedule over ``microbatches`` (this DP rank's share).

    ``chunks``: the model chunks (DDP-wrapped for training; plain modules for inference),
    one per virtual pipeline stage. ``forward_step(batch, model) -> (output_tensor,
    loss_func)`` sees one (CP-sliced) microbatch dict. Every microbatch must have the same
    ``[micro_batch, seq]`` token shape when PP > 1 (the stages exchange fixed-shape
    activations); ``seq_length`` defaults to that of ``tokens`` (the full, unsliced length).
    ``forward_only`` runs under ``torch.no_grad`` with the chunks in eval mode.

    Returns what Megatron returns on the last pipeline stage: one ``report`` per
    microbatch, or with ``collect_non_loss_data`` one ``loss_func(output,
    non_loss_data=True)`` value per microbatch; an empty list on other stages.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("run_schedule needs at least one microbatch")
    micro, seq = (int(d) for d in microbatches[0]["tokens"].shape[:2])
    if ps.get_pipeline_model_parallel_world_size() > 1:
        shapes = {tuple(mb["tokens"].shape[:2]) for mb in microbatches}
        if len(shapes) > 1:
            raise ValueError(
                "with pipeline parallelism every microbatch needs the same [batch, seq] shape; "
                f"got {sorted(shapes)}"
            )
    sliced = [cp_slice(_to_device(mb)) for mb in microbatches]

    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    iterators = [iter(sliced) for _ in chunks]
    modes = [c.training for c in chunks]
    if forward_only:
        for c in chunks:
            c.eval()
    try:
        with torch.no_grad() if forward_only else torch.enable_grad():
            return get_forward_backward_func()(
                forward_step_func=step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(sliced),
                seq_length=seq_length or seq,
                micro_batch_size=micro,
                forward_only=forward_only,
                collect_non_loss_data=collect_non_loss_data,
            )
    finally:
        for c, mode in zip(chunks, modes, strict=True):
            c.train(mode)


def reduce_reports(
    reports: Sequence[dict[str, torch.Tensor]], keys: Sequence[str] | None = None
) -> dict[str, tuple[float, float]]:
    """Collective over the model's ranks: ``{name: (sum, count)}`` of the global batch.

    ``reports``: what :func:`run_schedule` returned (one ``{name: tensor([sum, count])}``
    per microbatch on the last pipeline stage, nothing elsewhere). Sums over microbatches,
    all-reduces over the data-parallel x context-parallel group, then broadcasts from the
    last pipeline stage, so every rank returns the same values. ``keys`` fixes the names
    (missing ones are 0); by default they are taken from the last stage's reports (one
    extra small broadcast when PP > 1). Use :func:`report_means` for ``sum / count``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    pp_group = ps.get_pipeline_model_parallel_group()
    if keys is None:
        names = [sorted(reports[0]) if reports else []] if last_stage else [None]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(
                names, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group
            )
        keys = names[0] or []
    keys = list(keys)
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=_device())
    if last_stage:
        for report in reports:
            for i, key in enumerate(keys):
                if key in report:
                    totals[i] += report[key].detach().double().to(totals.device).view(2)
        dist.all_reduce(totals, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(totals, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
    return {key: (totals[i, 0].item(), totals[i, 1].item()) for i, key in enumerate(keys)}


def report_means(reduced: dict[str, tuple[float, float]]) -> dict[str, float]:
    """``sum / count`` per name (a zero count divides by 1, so an empty report gives 0)."""
    return {key: s / max(c, 1.0) for key, (s, c) in reduced.items()}

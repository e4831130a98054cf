"""``--dry-run``: what a job would do, without a GPU or a process group.

Prints the resolved config, the parallel layout (which ranks hold which layers), exact
parameter counts (total and per rank), a per-GPU memory estimate and the token budget.

Memory model (bytes per parameter on a rank, Megatron's distributed optimizer with bf16
params and fp32 gradient buffers): 2 (bf16 weights) + 4 (fp32 grads) + 12 / DP (fp32 master
weights, Adam m and v, sharded over data-parallel ranks); fp32 training: 4 + 4 + 12/DP.
Activations per layer and microbatch follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation") with fused/flash attention, which never stores the s x s score matrix (the
paper's 5*a*s/h term): 34*s*b*h bytes (no or selective recompute), 2*s*b*h (the layer input)
with full recompute, /TP with sequence parallelism, /CP; the first pipeline stage keeps PP
microbatches in flight under 1F1B. It is an estimate (no allocator fragmentation,
no communication buffers): leave 10-15% headroom.
"""

from __future__ import annotations

from typing import Any

import yaml

from qmath_megatron.config.job import JobConfig
from qmath_megatron.config.overrides import to_dict
from qmath_megatron.models.builder import check_parallel_fits, padded_vocab_size
from qmath_megatron.models.flavors import QwenFlavor, count_parameters, format_billions
from qmath_megatron.training.loop import job_flavor


def layer_params_per_tp_rank(f: QwenFlavor, tp: int) -> int:
    h, d = f.hidden_size, f.head_dim
    q, kv = f.num_attention_heads * d, f.num_query_groups * d
    matrices = h * (q + 2 * kv) + q * h + 3 * h * f.ffn_hidden_size
    biases = q + 2 * kv
    return (matrices + biases) // tp + 2 * h  # the two RMSNorm weights are replicated


def layout(job: JobConfig, flavor: QwenFlavor, world: int) -> list[dict[str, Any]]:
    """One entry per (pipeline rank, virtual stage): its layers and the global ranks holding it."""
    p = job.parallel
    dp = p.data_parallel_size(world)
    vpp = p.vpp or 1
    per_chunk = flavor.num_layers // (p.pp * vpp)
    stages = []
    for pp_rank in range(p.pp):
        # Megatron's default rank order tp-cp-dp-pp: pp is the slowest-varying dimension.
        ranks = list(range(pp_rank * p.tp * p.cp * dp, (pp_rank + 1) * p.tp * p.cp * dp))
        for v in range(vpp):
            first = (v * p.pp + pp_rank) * per_chunk
            stages.append(
                {
                    "pp_rank": pp_rank,
                    "virtual_stage": v,
                    "layers": (first, first + per_chunk),
                    "ranks": (ranks[0], ranks[-1]),
                }
            )
    return stages


def params_per_rank(job: JobConfig, flavor: QwenFlavor) -> dict[str, int]:
    """Parameters held by one rank of the first and of the last pipeline stage."""
    p = job.parallel
    vocab = padded_vocab_size(flavor.vocab_size, p.tp)
    layers = flavor.num_layers // p.pp
    body = layers * layer_params_per_tp_rank(flavor, p.tp)
    embedding = vocab * flavor.hidden_size // p.tp
    # The output layer: its own weight when untied; with tied embeddings and PP > 1 the
    # last stage holds a copy of the embedding (Megatron's shared_embedding).
    head = embedding if (not flavor.tie_word_embeddings or p.pp > 1) else 0
    first = body + embedding + (flavor.hidden_size + head if p.pp == 1 else 0)
    last = body + flavor.hidden_size + head if p.pp > 1 else first
    return {"first_stage": first, "last_stage": last}


def memory_estimate_gb(
    job: JobConfig, flavor: QwenFlavor, params: int, dp: int, first_stage: bool
) -> dict[str, float]:
    weight_bytes = 4 if job.precision.dtype == "fp32" else 2
    weights = params * weight_bytes
    grads = params * 4
    optimizer = params * 12 / (dp if job.optim.use_distributed_optimizer else 1)
    s, b, h, a = (
        job.model.seq_length,
        job.data.micro_batch_size,
        flavor.hidden_size,
        flavor.num_attention_heads,
    )
    p = job.parallel
    s_local = s / p.cp
    del a  # flash attention: no s x s term (see the module docstring)
    per_layer = (2 if job.model.recompute == "full" else 34) * s_local * b * h
    per_layer /= p.tp if p.sequence_parallel else 1
    layers = flavor.num_layers // p.pp
    in_flight = p.pp if first_stage else 1
    activations = per_layer * layers * in_flight
    gb = 1e9
    return {
        "weights": weights / gb,
        "grads": grads / gb,
        "optimizer": optimizer / gb,
        "activations": activations / gb,
        "total": (weights + grads + optimizer + activations) / gb,
    }


_UNSET = object()


def dry_run(job: JobConfig, world: int | None = None, iterations: Any = _UNSET) -> dict[str, Any]:
    """The plan of any stage's job. ``iterations``: the run's optimizer steps when the
    stage knows them (default ``job.total_iters()``); None when they depend on data that
    is not there yet (SFT epochs before ``qmath data sft-prepare``)."""
    flavor = job_flavor(job)
    check_parallel_fits(flavor, job.parallel)
    world = world or job.parallel.model_parallel_size * (job.parallel.dp or 1)
    dp = job.parallel.data_parallel_size(world)
    if job.data.global_batch_size % (job.data.micro_batch_size * dp):
        raise ValueError(
            f"global batch {job.data.global_batch_size} is not divisible by micro batch "
            f"{job.data.micro_batch_size} x DP {dp}"
        )
    iters = job.total_iters() if iterations is _UNSET else iterations
    per_rank = params_per_rank(job, flavor)
    total = count_parameters(
        flavor, vocab_size=padded_vocab_size(flavor.vocab_size, job.parallel.tp)
    )
    return {
        "config": to_dict(job),
        "world_size": world,
        "data_parallel_size": dp,
        "microbatches_per_step": job.data.global_batch_size // (job.data.micro_batch_size * dp),
        "layout": layout(job, flavor, world),
        "params_total": format_billions(count_parameters(flavor)),
        "params_total_padded_vocab": format_billions(total),
        "params_per_rank": {k: format_billions(v) for k, v in per_rank.items()},
        "memory_gb_per_gpu": {
            "first_stage": memory_estimate_gb(job, flavor, per_rank["first_stage"], dp, True),
            "last_stage": memory_estimate_gb(job, flavor, per_rank["last_stage"], dp, False),
        },
        "tokens_per_iteration": job.data.global_batch_size * job.model.seq_length,
        "iterations": iters,
        "tokens_total": None
        if iters is None
        else iters * job.data.global_batch_size * job.model.seq_length,
    }


def format_dry_run(plan: dict[str, Any]) -> str:
    lines = ["# resolved config", yaml.safe_dump(plan["config"], sort_keys=False).rstrip(), ""]
    lines.append(
        f"world size {plan['world_size']} = TP x CP x DP x PP "
        f"with DP = {plan['data_parallel_size']}; "
        f"{plan['microbatches_per_step']} microbatches per step per DP rank"
    )
    lines.append(
        "layout (pipeline rank / virtual stage: layers [first, last) on ranks first..last):"
    )
    for st in plan["layout"]:
        lines.append(
            f"  pp {st['pp_rank']} / v {st['virtual_stage']}: "
            f"layers [{st['layers'][0]}, {st['layers'][1]}) "
            f"on ranks {st['ranks'][0]}..{st['ranks'][1]}"
        )
    lines.append(
        f"parameters: {plan['params_total']} "
        f"({plan['params_total_padded_vocab']} with padded vocab); "
        f"per rank: first stage {plan['params_per_rank']['first_stage']}, "
        f"last stage {plan['params_per_rank']['last_stage']}"
    )
    for stage, mem in plan["memory_gb_per_gpu"].items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in mem.items() if k != "total")
        lines.append(f"memory per GPU ({stage.replace('_', ' ')}): {mem['total']:.1f} GB ({parts})")
    if plan["iterations"] is None:
        lines.append(
            f"token budget: {plan['tokens_per_iteration']:,} token slots per iteration; iterations "
            "depend on the dataset (not found yet)"
        )
    else:
        lines.append(
            f"token budget: {plan['iterations']:,} iterations "
            f"x {plan['tokens_per_iteration']:,} tokens = {plan['tokens_total']:,} tokens"
        )
    return "\n".join(lines)

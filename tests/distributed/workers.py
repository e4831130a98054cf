"""Worker functions run in spawned gloo process groups (must be importable for spawn)."""

from __future__ import annotations

import torch


def train_steps_worker(ckpt: str, tp: int, pp: int, steps: int, distributed_optimizer: bool):
    """Load a converted checkpoint at TP x PP and take ``steps`` AdamW steps on fixed data."""
    from megatron.core import parallel_state

    from qmath_megatron.checkpoint.model_checkpoint import load_model, resolve_checkpoint
    from qmath_megatron.config.optimizer import OptimConfig
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.training.step import build_optimizer, lm_microbatch, train_step, wrap_ddp

    iter_dir, meta = resolve_checkpoint(ckpt)
    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize(parallel, seed=7)
    precision = PrecisionConfig(dtype="fp32")
    config = build_transformer_config(meta.flavor, parallel, precision)
    chunks = build_model(meta.flavor, config, padded_vocab=meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    optim = OptimConfig(lr=1e-2, min_lr=0.0, use_distributed_optimizer=distributed_optimizer)
    ddp = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(ddp, optim, precision)

    seq, global_batch, micro = 32, 4, 1
    gen = torch.Generator().manual_seed(123)
    data = torch.randint(0, meta.flavor.vocab_size, (steps, global_batch, seq + 1), generator=gen)
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    results = []
    for step in range(steps):
        share = data[step].chunk(dp_size)[dp_rank]
        microbatches = [lm_microbatch(mb) for mb in share.split(micro)]
        r = train_step(ddp, optimizer, microbatches, seq)
        results.append((r.loss, r.grad_norm, r.tokens))
    return results


def pretrain_worker(overrides: list[str]) -> list[dict]:
    """`qmath train pretrain --recipe tiny_cpu OVERRIDES` inside a spawned rank."""
    from qmath_megatron.pretrain.task import pretrain
    from qmath_megatron.training.cli import resolve_job

    return pretrain(resolve_job("tiny_cpu", None, overrides))

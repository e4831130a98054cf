"""Continued pretraining on Megatron-Core: ``qmath train pretrain``.

`pretrain` reads on one screen: set up, then per step: batch, train step, LR schedule,
log, save, eval. The pieces live next to it (data, step, checkpointing, metrics).
Launch with torchrun (any TP/PP/DP); on CPU, with gloo.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from qmath_megatron.config.job import PretrainJob
from qmath_megatron.config.overrides import to_dict
from qmath_megatron.models.flavors import QwenFlavor, get_flavor

logger = logging.getLogger(__name__)


def job_flavor(job: PretrainJob) -> QwenFlavor:
    """The model architecture, with the job's long-context overrides applied."""
    flavor = get_flavor(job.model.flavor)
    changes = {}
    if job.model.rope_theta is not None:
        changes["rope_theta"] = job.model.rope_theta
    if job.model.max_position_embeddings is not None:
        changes["max_position_embeddings"] = job.model.max_position_embeddings
    flavor = flavor.replace(**changes) if changes else flavor
    if job.model.seq_length > flavor.max_position_embeddings:
        raise ValueError(
            f"model.seq_length {job.model.seq_length} exceeds max_position_embeddings "
            f"{flavor.max_position_embeddings} of {flavor.name}; raise model.max_position_embeddings"
        )
    return flavor


def recompute_kwargs(job: PretrainJob) -> dict:
    if job.model.recompute == "selective":
        return {"recompute_granularity": "selective"}
    if job.model.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": job.model.recompute_num_layers}  # fmt: skip
    return {}


def build_scheduler(optimizer, job: PretrainJob, total_iters: int):
    """Megatron's OptimizerParamScheduler, stepped in samples (as Megatron-LM does)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = job.data.global_batch_size
    decay_iters = job.scheduler.decay_iters or total_iters
    if job.scheduler.warmup_iters >= decay_iters:
        raise ValueError(
            f"scheduler.warmup_iters ({job.scheduler.warmup_iters}) must be smaller than the decay "
            f"length ({decay_iters} iterations)"
        )
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if job.scheduler.warmup_iters else job.optim.lr,
        max_lr=job.optim.lr,
        min_lr=job.optim.min_lr,
        lr_warmup_steps=job.scheduler.warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs,
        lr_decay_style=job.scheduler.decay_style,
        start_wd=job.optim.weight_decay,
        end_wd=job.optim.weight_decay,
        wd_incr_steps=decay_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=int(job.scheduler.wsd_decay_fraction * decay_iters) * gbs
        if job.scheduler.decay_style == "WSD" else None,
        lr_wsd_decay_style=job.scheduler.wsd_decay_style if job.scheduler.decay_style == "WSD" else None,
    )  # fmt: skip


def _prepare_data(job: PretrainJob, is_main: bool) -> PretrainJob:
    import torch.distributed as dist

    from qmath_megatron.training.data import prepare_synthetic_data

    if job.data.blend or job.data.synthetic_documents <= 0:
        return job
    if not job.checkpoint.save:
        raise ValueError("synthetic data needs checkpoint.save (its work directory)")
    workdir = Path(job.checkpoint.save) / "data"
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        data = prepare_synthetic_data(job.data, workdir)
    dist.barrier()
    if not is_main:
        data = prepare_synthetic_data(job.data, workdir)  # finds what rank 0 built
    return replace(job, data=data)


def pretrain(job: PretrainJob) -> list[dict]:
    """Train; returns the logged metrics of this process (rank 0 logs all of them)."""

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from qmath_megatron.checkpoint.model_checkpoint import ModelMeta, load_model, resolve_checkpoint
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.training import checkpointing as ckpt
    from qmath_megatron.training.data import build_datasets, global_batch_microbatches
    from qmath_megatron.training.metrics import (
        MetricsSink,
        memory_gb,
        peak_tflops,
        train_flops_per_token,
    )
    from qmath_megatron.training.step import build_optimizer, train_step, wrap_ddp

    # ---- set-up ------------------------------------------------------------------------
    ctx = initialize(job.parallel, seed=job.train.seed)
    job = _prepare_data(job, ctx.is_main)
    flavor, total_iters = job_flavor(job), job.total_iters()
    seq, gbs = job.model.seq_length, job.data.global_batch_size
    config = build_transformer_config(flavor, job.parallel, job.precision, **recompute_kwargs(job))
    resume_root = job.checkpoint.load or job.checkpoint.save
    resume_iter = ckpt.latest_iteration(resume_root) if resume_root else None
    init_meta = (
        resolve_checkpoint(job.model.init_from)[1]
        if job.model.init_from and resume_iter is None
        else None
    )
    padded = (
        init_meta.padded_vocab_size
        if init_meta
        else padded_vocab_size(flavor.vocab_size, job.parallel.tp)
    )
    chunks = build_model(
        flavor, config, padded_vocab=padded, max_sequence_length=flavor.max_position_embeddings
    )
    if init_meta is not None:
        load_model(
            chunks,
            resolve_checkpoint(job.model.init_from)[0],
            init_meta,
            current_spec=_spec(chunks),
        )
    ddp = wrap_ddp(chunks, job.optim)
    optimizer = build_optimizer(ddp, job.optim, job.precision)
    scheduler = build_scheduler(optimizer, job, total_iters)
    state = ckpt.TrainState()
    if job.checkpoint.save and ctx.is_main:
        ckpt.clean_partial_saves(job.checkpoint.save)
    saver = None
    if job.checkpoint.save:
        c = job.checkpoint
        saver = ckpt.Checkpointer(c.save, c.keep_last, c.optimizer_format, c.async_save)
    if resume_iter is not None:
        iter_dir = Path(resume_root) / f"iter_{resume_iter:07d}"
        state = ckpt.load(iter_dir, chunks, optimizer, scheduler, job.checkpoint.optimizer_format)
        if ctx.is_main:
            print(
                f"resumed from {iter_dir} at iteration {state.iteration} ({state.consumed_samples} samples)",
                flush=True,
            )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    datasets = build_datasets(job.data, seq, job.train.seed, total_iters * gbs,
                              job.train.eval_iters * gbs * (total_iters // job.train.eval_interval + 1)
                              if job.train.eval_interval else 0)  # fmt: skip
    meta = ModelMeta(flavor=flavor, padded_vocab_size=padded, dtype=job.precision.dtype, layer_spec=_spec(chunks),
                     tp=job.parallel.tp, pp=job.parallel.pp, vpp=job.parallel.vpp)  # fmt: skip
    sink = None
    if ctx.is_main:
        jsonl = job.logging.jsonl or (
            str(Path(job.checkpoint.save) / "metrics.jsonl") if job.checkpoint.save else None
        )
        sink = MetricsSink(jsonl, job.logging.tensorboard_dir, job.logging.wandb_project, job.logging.wandb_mode,
                           job.name, to_dict(job))  # fmt: skip
    flops_per_iter = train_flops_per_token(flavor, seq, padded) * gbs * seq
    peak = job.logging.peak_tflops or peak_tflops("fp8" if job.precision.fp8 else "bf16")
    world = dist.get_world_size()
    history: list[dict] = []
    mbs_size = job.data.micro_batch_size

    # ---- loop --------------------------------------------------------------------------
    every = lambda n: bool(n) and state.iteration % n == 0  # noqa: E731
    while state.iteration < total_iters:
        start = time.time()
        mbs = global_batch_microbatches(
            datasets.train, state.consumed_samples, gbs, mbs_size, dp_rank, dp_size
        )
        if job.parallel.cp > 1:  # each CP rank gets its (load-balanced) slice of the sequence
            from megatron.core.utils import get_batch_on_this_cp_rank

            mbs = [get_batch_on_this_cp_rank(mb) for mb in mbs]
        result = train_step(ddp, optimizer, mbs, seq, skip_nonfinite=job.train.skip_nonfinite)
        state.iteration += 1
        state.consumed_samples += gbs
        if result.update_successful:
            scheduler.step(increment=gbs)
        _count_nonfinite(state, result)
        elapsed = time.time() - start
        if every(job.logging.log_interval) or state.iteration == total_iters:
            tflops = flops_per_iter / elapsed / world / 1e12
            metrics = {"loss": result.loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": result.grad_norm,
                       "tokens_per_s": gbs * seq / elapsed, "tflops_per_device": tflops,
                       "mfu": tflops / peak if peak else float("nan"), "skipped": state.nonfinite_skipped,
                       "step_s": elapsed, **memory_gb()}  # fmt: skip
            history.append({"iteration": state.iteration, **metrics})
            if sink:
                sink.log(state.iteration, metrics)
        _check_nonfinite(state, result, job)
        stop = state.iteration in (total_iters, job.train.exit_after_iters)
        if saver and (stop or every(job.checkpoint.save_interval)):
            meta.iteration = state.iteration
            saver.save(chunks, optimizer, scheduler, state, meta)
        if saver:
            saver.poll()
        if every(job.train.eval_interval) and datasets.valid is not None:
            val = evaluate(ddp, datasets.valid, job, state.iteration, dp_rank, dp_size)
            if sink:
                sink.log(state.iteration, {"val_loss": val})
        if stop:
            break
    if saver:
        saver.finalize()
    if sink:
        sink.close()
    return history


def _count_nonfinite(state, result) -> None:
    """Count skipped (non-finite) steps, in total and in a row."""
    if result.update_successful:
        state.consecutive_nonfinite = 0
    else:
        state.nonfinite_skipped += 1
        state.consecutive_nonfinite += 1


def _check_nonfinite(state, result, job: PretrainJob) -> None:
    """Stop (after the step was logged) when too many steps in a row were non-finite."""
    limit = job.train.max_consecutive_nonfinite if job.train.skip_nonfinite else 1
    if state.consecutive_nonfinite >= limit:
        raise FloatingPointError(
            f"{state.consecutive_nonfinite} consecutive step(s) with non-finite loss or grad norm "
            f"(last: loss {result.loss}, grad norm {result.grad_norm}) at iteration {state.iteration}; "
            "stopping. Lower the learning rate, check the data, or resume from an earlier checkpoint."
        )


def evaluate(
    ddp: list, dataset, job: PretrainJob, iteration: int, dp_rank: int, dp_size: int
) -> float:
    """Mean LM loss on ``eval_iters`` validation global batches (forward only)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from qmath_megatron.training.data import global_batch_microbatches
    from qmath_megatron.training.step import _forward_step

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gbs, total = job.data.global_batch_size, torch.zeros(2, dtype=torch.float64, device=device)
    for chunk in ddp:
        chunk.eval()
    with torch.no_grad():
        for i in range(job.train.eval_iters):
            mbs = global_batch_microbatches(dataset, (iteration // job.train.eval_interval * job.train.eval_iters + i) * gbs,
                                            gbs, job.data.micro_batch_size, dp_rank, dp_size)  # fmt: skip
            its = [iter(mbs) for _ in ddp]
            out = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=its if len(ddp) > 1 else its[0],
                model=ddp if len(ddp) > 1 else ddp[0], num_microbatches=len(mbs), seq_length=job.model.seq_length,
                micro_batch_size=job.data.micro_batch_size, forward_only=True,
            )  # fmt: skip
            for item in out:
                total += item["lm loss"].double().to(device)
    for chunk in ddp:
        chunk.train()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=ps.get_data_parallel_group())
    dist.broadcast(
        total,
        src=ps.get_pipeline_model_parallel_last_rank(),
        group=ps.get_pipeline_model_parallel_group(),
    )
    return (total[0] / total[1].clamp(min=1)).item()


def _spec(chunks: list) -> str:
    from qmath_megatron.models.builder import transformer_engine_available

    return "te" if transformer_engine_available() else "local"

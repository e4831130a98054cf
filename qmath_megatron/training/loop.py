"""The one training loop every stage uses (``qmath train pretrain|sft|rm|grpo``).

:func:`train` reads on one screen: set-up (process groups, model from the task, DDP,
optimizer, scheduler, resume), then per step: the task's pre-step work and microbatches,
the train step through the shared schedule call, LR schedule, metrics, save, eval, and the
preemption check. What a stage supplies is a :class:`~qmath_megatron.training.task.Task`
(see its module docstring for the protocol). Launch with torchrun (any TP/PP/CP/DP); on
CPU, with gloo.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from qmath_megatron.checkpoint.model_checkpoint import resolve_checkpoint
from qmath_megatron.config.job import JobConfig
from qmath_megatron.config.overrides import to_dict
from qmath_megatron.models.builder import build_transformer_config, padded_vocab_size
from qmath_megatron.models.flavors import QwenFlavor, get_flavor
from qmath_megatron.parallel.runtime import initialize, parallel_ranks, pipeline_stage
from qmath_megatron.training import checkpointing as ckpt
from qmath_megatron.training.metrics import (
    MetricsSink,
    memory_gb,
    peak_tflops,
    train_flops_per_token,
)
from qmath_megatron.training.resume import check_data, check_resume
from qmath_megatron.training.signals import ExitSignalHandler
from qmath_megatron.training.step import build_optimizer, train_step, wrap_ddp
from qmath_megatron.training.task import Task, TrainContext

logger = logging.getLogger(__name__)


def job_flavor(job: JobConfig) -> QwenFlavor:
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
            f"{flavor.max_position_embeddings} of {flavor.name}; "
            "raise model.max_position_embeddings"
        )
    return flavor


def recompute_kwargs(job: JobConfig) -> dict:
    if job.model.recompute == "selective":
        return {"recompute_granularity": "selective"}
    if job.model.recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": job.model.recompute_num_layers,
        }
    return {}


def build_scheduler(optimizer, job: JobConfig, total_iters: int, override: bool = False):
    """Megatron's OptimizerParamScheduler, stepped in samples (as Megatron-LM does).
    ``override``: take this job's values over a resumed checkpoint's (see training/resume.py)."""
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
        if job.scheduler.decay_style == "WSD"
        else None,
        lr_wsd_decay_style=job.scheduler.wsd_decay_style
        if job.scheduler.decay_style == "WSD"
        else None,
        override_opt_param_scheduler=override,
    )


def _context(job: JobConfig, dist_ctx) -> TrainContext:
    ranks = parallel_ranks()
    first, last = pipeline_stage()
    return TrainContext(
        job=job,
        rank=dist_ctx.rank,
        world_size=dist_ctx.world_size,
        is_main=dist_ctx.is_main,
        device=dist_ctx.device,
        dp_rank=ranks["dp_rank"],
        dp_size=ranks["dp_size"],
        tp_rank=ranks["tp_rank"],
        is_first_stage=first,
        is_last_stage=last,
    )


def train(job: JobConfig, task: Task) -> list[dict]:
    """Train ``task``; returns the logged metrics of this process (rank 0 logs all of them)."""
    # ---- set-up ------------------------------------------------------------------------
    started = time.time()
    # Installed first: a signal during set-up (a long load) also ends in a checkpoint.
    exits = ExitSignalHandler(
        job.train.exit_signals, job.train.exit_duration_minutes, started
    ).__enter__()
    try:
        if job.checkpoint.save:
            ckpt.check_save_dir(job.checkpoint.save)  # before any long set-up
        ctx = _context(job, initialize(job.parallel, seed=job.train.seed))
        job = ctx.job = task.job = task.prepare(ctx)
        ctx.flavor = job_flavor(job)
        resume_root = job.checkpoint.load or job.checkpoint.save
        resume_iter = ckpt.latest_iteration(resume_root) if resume_root else None
        resume_dir = (
            Path(resume_root) / f"iter_{resume_iter:07d}" if resume_iter is not None else None
        )
        override = resume_dir is not None and check_resume(
            resume_dir, job, job.checkpoint.allow_changed_settings
        )
        data_json = json.dumps(task.data_fingerprint(), sort_keys=True)
        if resume_dir is not None:
            check_data(resume_dir, json.loads(data_json), job.checkpoint.allow_changed_settings)
        ctx.padded_vocab = (
            resolve_checkpoint(resume_dir)[1].padded_vocab_size
            if resume_dir
            else task.init_padded_vocab()
        ) or padded_vocab_size(ctx.flavor.vocab_size, job.parallel.tp)
        config = build_transformer_config(
            ctx.flavor,
            job.parallel,
            job.precision,
            **recompute_kwargs(job),
            calculate_per_token_loss=task.calculate_per_token_loss,
        )
        ctx.unwrapped = task.build_model(ctx, config)
        if job.model.init_from and resume_dir is None:
            task.load_initial_weights(ctx.unwrapped, job.model.init_from)
        ctx.model = wrap_ddp(ctx.unwrapped, job.optim)
        optimizer = build_optimizer(ctx.model, job.optim, job.precision)
        task.setup(ctx)
        total_iters, gbs = task.total_iters(), job.data.global_batch_size
        scheduler = build_scheduler(optimizer, job, total_iters, override=override)
        state, saver, meta = ckpt.TrainState(), None, task.model_meta(ctx)
        if job.checkpoint.save:
            c = job.checkpoint
            if ctx.is_main:
                ckpt.clean_partial_saves(c.save)
            ckpt.bind_checkpoint_children()
            saver = ckpt.Checkpointer(c.save, c.keep_last, c.optimizer_format, c.async_save)
        if resume_dir is not None:
            extra: dict = {}
            state = ckpt.load(
                resume_dir,
                ctx.unwrapped,
                optimizer,
                scheduler,
                job.checkpoint.optimizer_format,
                extra,
            )
            task.load_state_dict(extra)
            if ctx.is_main:
                print(
                    f"resumed from {resume_dir} at iteration {state.iteration} "
                    f"({state.consumed_samples} samples)",
                    flush=True,
                )
        sink = None
        if ctx.is_main:
            jsonl = job.logging.jsonl or (
                str(Path(job.checkpoint.save) / "metrics.jsonl") if job.checkpoint.save else None
            )
            sink = MetricsSink(
                jsonl,
                job.logging.tensorboard_dir,
                job.logging.wandb_project,
                job.logging.wandb_mode,
                job.name,
                to_dict(job),
                resumed_iteration=state.iteration if resume_dir is not None else None,
            )
        step_tokens = task.step_tokens()
        flops_per_iter = (
            train_flops_per_token(ctx.flavor, job.model.seq_length, ctx.padded_vocab) * step_tokens
        )
        peak = job.logging.peak_tflops or peak_tflops("fp8" if job.precision.fp8 else "bf16")
        history: list[dict] = []
        job_json = _job_json(job)
    except BaseException:
        exits.__exit__()  # a failed set-up leaves the process's handlers as they were
        raise

    # ---- loop --------------------------------------------------------------------------
    def every(n: int | None) -> bool:
        return bool(n) and state.iteration % n == 0

    try:
        while state.iteration < total_iters:
            start = time.time()
            pre = task.before_step(ctx, state)
            mbs = task.microbatches(ctx, state)
            result = train_step(
                ctx.model,
                optimizer,
                mbs,
                forward_step=task.forward_step,
                loss_key=task.loss_key,
                skip_nonfinite=job.train.skip_nonfinite,
            )
            state.iteration += 1
            state.consumed_samples += gbs
            if result.update_successful:
                scheduler.step(increment=gbs)
            _count_nonfinite(state, result)
            elapsed = time.time() - start
            exit_reason = exits.should_exit()
            stop = (
                state.iteration in (total_iters, job.train.exit_after_iters)
                or exit_reason is not None
            )
            if every(job.logging.log_interval) or stop:
                tflops = flops_per_iter / elapsed / ctx.world_size / 1e12
                metrics = {
                    "loss": result.loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": result.grad_norm,
                    "tokens_per_s": step_tokens / elapsed,
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak if peak else float("nan"),
                    "skipped": state.nonfinite_skipped,
                    "step_s": elapsed,
                    **memory_gb(),
                    **_report_metrics(result, task.loss_key),
                    **pre,
                    **task.step_metrics(ctx, state, result),
                }
                history.append({"iteration": state.iteration, **metrics})
                if sink:
                    sink.log(state.iteration, metrics)
            _check_nonfinite(state, result, job)
            if saver and (stop or every(job.checkpoint.save_interval)):
                meta.iteration = state.iteration
                saver.save(
                    ctx.unwrapped,
                    optimizer,
                    scheduler,
                    state,
                    meta,
                    job_json,
                    task.state_dict(),
                    data_json,
                )
            if saver:
                saver.poll()
            if every(job.train.eval_interval):
                val = task.evaluate(ctx, state)
                if sink and val:
                    sink.log(state.iteration, val)
            if exit_reason is not None:
                if ctx.is_main:
                    done = (
                        f"saved iteration {state.iteration}"
                        if saver
                        else "no checkpoint.save, nothing saved"
                    )
                    print(f"{exit_reason}: {done}, exiting", flush=True)
                break
            if stop:
                break
    finally:
        task.close()
        exits.__exit__()
    if saver:
        saver.finalize()
    if sink:
        sink.close()
    return history


def _job_json(job: JobConfig) -> str:
    return json.dumps(to_dict(job), indent=2, default=str) + "\n"


def _report_metrics(result, loss_key: str) -> dict[str, float]:
    """The loss function's other report entries, named without spaces."""
    return {k.replace(" ", "_"): v for k, v in result.reports.items() if k != loss_key}


def _count_nonfinite(state, result) -> None:
    """Count skipped (non-finite) steps, in total and in a row."""
    if result.update_successful:
        state.consecutive_nonfinite = 0
    else:
        state.nonfinite_skipped += 1
        state.consecutive_nonfinite += 1


def _check_nonfinite(state, result, job: JobConfig) -> None:
    """Stop (after the step was logged) when too many steps in a row were non-finite."""
    limit = job.train.max_consecutive_nonfinite if job.train.skip_nonfinite else 1
    if state.consecutive_nonfinite >= limit:
        raise FloatingPointError(
            f"{state.consecutive_nonfinite} consecutive step(s) with non-finite loss or grad norm "
            f"(last: loss {result.loss}, grad norm {result.grad_norm}) "
            f"at iteration {state.iteration}; stopping. Lower the learning rate, check the data, "
            "or resume from an earlier checkpoint."
        )

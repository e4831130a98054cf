"""Reward-model workers run in spawned gloo process groups (importable for spawn)."""

from __future__ import annotations

import torch


def _rm_step(iter_dir: str, parallel, groups: list) -> tuple[float, float, dict]:
    """One RM optimizer step (loss, grad norm, reports) from a checkpoint at ``parallel``."""
    from qmath_megatron.checkpoint.model_checkpoint import load_model, resolve_checkpoint
    from qmath_megatron.config.optimizer import OptimConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_transformer_config
    from qmath_megatron.parallel.runtime import parallel_ranks, set_parallel_layout
    from qmath_megatron.reward_model.loss import LOSS_KEY
    from qmath_megatron.reward_model.model import build_reward_model
    from qmath_megatron.reward_model.task import group_microbatches, rm_forward_step
    from qmath_megatron.training.step import build_optimizer, train_step, wrap_ddp

    iter_dir, meta = resolve_checkpoint(iter_dir)
    set_parallel_layout(parallel)
    precision = PrecisionConfig(dtype="fp32")
    # perform_initialization must stay on for training: megatron-core 0.16 sets the
    # `tensor_model_parallel` attributes of sharded weights only while initialising them,
    # and the grad norm counts a weight without them once (as a TP duplicate).
    config = build_transformer_config(
        meta.flavor, parallel, precision, calculate_per_token_loss=True
    )
    chunks = build_reward_model(
        meta.flavor, config, padded_vocab=meta.padded_vocab_size, use_te=False
    )
    load_model(chunks, iter_dir, meta, current_spec="local")
    optim = OptimConfig(lr=1e-3, min_lr=0.0, use_distributed_optimizer=False)
    ddp = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(ddp, optim, precision)
    ranks = parallel_ranks()
    share = len(groups) // ranks["dp_size"]
    mine = groups[ranks["dp_rank"] * share : (ranks["dp_rank"] + 1) * share]
    mbs = group_microbatches(mine, 2, 64, 0)
    r = train_step(ddp, optimizer, mbs, forward_step=rm_forward_step, loss_key=LOSS_KEY)
    return r.loss, r.grad_norm, r.reports


def _init_from_lm(save_dir: str) -> dict:
    """Save a random language model (GPTModel with LM head, TP=2) as an "SFT" checkpoint,
    then load it as ``model.init_from`` of a reward model: backbone equal, head untouched."""
    import torch.distributed as dist

    from qmath_megatron.checkpoint.model_checkpoint import ModelMeta, save_model, write_tracker
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.parallel.runtime import set_parallel_layout
    from qmath_megatron.reward_model.model import build_reward_model, load_initial_weights

    parallel = ParallelConfig(tp=2)
    set_parallel_layout(parallel)
    flavor = get_flavor("tiny-qwen-vocab")
    padded = padded_vocab_size(flavor.vocab_size, 2)
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    torch.manual_seed(11)
    lm = build_model(flavor, config, padded_vocab=padded, use_te=False)
    with torch.no_grad():  # norms away from their all-ones init, so a skipped load shows
        for name, p in lm[0].named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    meta = ModelMeta(
        flavor=flavor, padded_vocab_size=padded, dtype="fp32", layer_spec="local", tp=2, pp=1
    )
    save_model(lm, f"{save_dir}/release", meta)
    if dist.get_rank() == 0:
        write_tracker(save_dir, "release")
    dist.barrier()
    rm = build_reward_model(flavor, config, padded_vocab=padded, use_te=False)
    head = {n: p.detach().clone() for n, p in rm[0].named_parameters() if n.startswith("score.")}
    load_initial_weights(rm, save_dir)
    lm_params = dict(lm[0].named_parameters())
    backbone_equal = all(
        torch.equal(p, lm_params[n])
        for n, p in rm[0].named_parameters()
        if not n.startswith("score.")
    )
    head_kept = all(torch.equal(p, head[n]) for n, p in rm[0].named_parameters() if n in head)
    return {
        "backbone_equal": backbone_equal,
        "head_kept": head_kept,
        "head_params": sorted(head),
        "lm_only": sorted(set(lm_params) - {n for n, _ in rm[0].named_parameters()}),
    }


def rm_parallel_worker(
    hf_dir: str, iter_dir: str, groups: list, rows: list, train_overrides: list[str]
) -> dict:
    """Score parity with the HF reference at TP=2 and at PP=2 (the verify code path), the
    scores of ``rows`` (token ids) as `qmath rm score` computes them for a Megatron
    checkpoint (at TP=2), one optimizer step at TP=2 and at TP=1 x DP=2, then the tiny
    RM training run at DP=2 (2 processes; one spawn for all, to save start-up time)."""
    from qmath_megatron.checkpoint.model_checkpoint import resolve_checkpoint
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.reward_model.convert import _verify_worker
    from qmath_megatron.reward_model.scoring import _megatron_score_worker

    iter_dir = str(resolve_checkpoint(iter_dir)[0])
    out: dict = {}
    for name, parallel in (("tp2", ParallelConfig(tp=2)), ("pp2", ParallelConfig(pp=2))):
        result = _verify_worker(hf_dir, iter_dir, parallel, 6, 48, 0)
        if result is not None:
            out[name] = result
    out["rows"] = _megatron_score_worker(iter_dir, 2, 1, rows, 4)
    for name, parallel in (("step_tp2", ParallelConfig(tp=2)), ("step_tp1", ParallelConfig(tp=1))):
        out[name] = _rm_step(iter_dir, parallel, groups)
    lm_dir = train_overrides[0].split("=", 1)[1] + "_sft_lm"  # beside checkpoint.save
    out["init_from"] = _init_from_lm(lm_dir)
    out["train"] = tiny_rm_train_worker([*train_overrides, f"model.init_from={lm_dir}"])
    return out


def tiny_rm_train_worker(overrides: list[str]) -> list[dict]:
    """``qmath train rm --recipe tiny_cpu_rm OVERRIDES`` inside a spawned rank."""
    from qmath_megatron.reward_model.task import RewardModelTask
    from qmath_megatron.training.cli import resolve_job
    from qmath_megatron.training.loop import train

    job = resolve_job("tiny_cpu_rm", None, overrides, stage="rm")
    torch.manual_seed(0)
    return train(job, RewardModelTask(job))

"""Spawned-rank workers of the RL tests (importable for spawn)."""

from __future__ import annotations

import torch


def megatron_logprobs(chunks, flavor, tokens: torch.Tensor) -> torch.Tensor | None:
    """fp32 log-prob of tokens[1:] under the Megatron model (last stage; None elsewhere),
    normalised over the real vocabulary (the padded rows are not part of the HF model)."""
    from qmath_megatron.models.forward import forward_logits

    logits = forward_logits(chunks, tokens[None])
    if logits is None:
        return None
    logp = logits[0, :-1, : flavor.vocab_size].float().log_softmax(-1)
    return logp.gather(-1, tokens[1:, None])[:, 0]


def weight_sync_worker(
    flavor_dict: dict,
    tp: int,
    pp: int,
    handle,
    prompt: list[int],
    transport: str = "qmath_shm",
    bucket_mb: float = 1 / 16,
    dtype: str | None = None,
    sleep: bool = False,
) -> dict:
    """Build a random Megatron policy (fp32 parameters) at TP x PP and sync it twice into the
    engine behind ``handle`` over ``transport`` (``dtype`` tensors; default: the
    parameters'), the second time after a "training step" that moves every weight; the
    engine's prompt log-probs against Megatron's before and after each sync (and, without
    ``sleep``, after the step: stale). With ``sleep`` the engine sleeps while the trainer
    steps and the transport wakes it around the sync and the generation, as for colocated
    engines; a full sleep / wake in between must keep its log-probs and greedy tokens."""
    import torch.distributed as dist

    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.flavors import QwenFlavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.rl.weight_sync import build_transport

    flavor = QwenFlavor.from_dict(flavor_dict)
    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize(parallel, seed=11)
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    chunks = build_model(flavor, config)
    padded = padded_vocab_size(flavor.vocab_size, tp)
    client = handle.connect() if dist.get_rank() == 0 else None
    sync = build_transport(
        transport,
        chunks,
        flavor,
        padded,
        [handle],
        bucket_mb=bucket_mb,
        dtype=getattr(torch, dtype) if dtype else None,
        engines_sleep=sleep,
        sleeper=client,
    )
    tokens = torch.tensor(prompt)
    out: dict = {"rank": dist.get_rank(), "sender": sync.is_sender}

    def compare(tag: str) -> None:
        mine = megatron_logprobs(chunks, flavor, tokens)
        # The last stage has the log-probs; rank 0 talks to the engine.
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, None if mine is None else mine.tolist())
        ref = torch.tensor(next(g for g in gathered if g is not None))
        if client is not None:
            engine = torch.tensor(client.prompt_logprobs([prompt])[0])
            out[tag] = float((engine - ref).abs().max())
            out[tag + "_version"] = client.weight_version()

    def greedy() -> list[int]:
        from qmath_megatron.inference.engine import SamplingParams

        return client.generate([prompt], SamplingParams(max_new_tokens=8))[0][0].token_ids

    compare("before")
    if sleep and client is not None:
        client.sleep(level=1)  # a step starts with the engine asleep
    stats = sync.sync()
    sync.prepare_for_generation()
    out["stats1"] = (stats.version, stats.bytes, stats.buckets, stats.engines)
    compare("after1")
    if sleep and client is not None:
        lps = torch.tensor(client.prompt_logprobs([prompt])[0])
        tokens_before = greedy()
        client.sleep(level=1)  # weights to host memory, KV cache dropped
        client.wake_up()
        # The same weights come back: the same log-probs and the same greedy tokens.
        out["wake_diff"] = float(
            (torch.tensor(client.prompt_logprobs([prompt])[0]) - lps).abs().max()
        )
        out["same_greedy_after_wake"] = greedy() == tokens_before
    sync.finish_generation()
    with torch.no_grad():  # a "training step": every parameter moves (the same way on
        for chunk in chunks:  # every TP rank, so replicated parameters stay replicated)
            for p in chunk.parameters():
                p.mul_(1.1).add_(0.01)
    if not sleep:  # an asleep engine is not asked
        compare("stale")
    stats = sync.sync()
    sync.prepare_for_generation()
    out["stats2"] = (stats.version, stats.bytes, stats.buckets, stats.engines)
    compare("after2")
    sync.close()
    return out


def grpo_worker(overrides: list[str]) -> list[dict]:
    """`qmath train grpo --recipe tiny_cpu_grpo OVERRIDES` inside a spawned rank."""
    from qmath_megatron.training.cli import load_stage, resolve_job
    from qmath_megatron.training.loop import train

    job = resolve_job("tiny_cpu_grpo", None, overrides, "grpo")
    return train(job, load_stage("grpo").task(job))


def grpo_tp_worker(hf_dir: str, tp: int, batch: dict) -> tuple[float, float, dict]:
    """One GRPO optimizer step on fixed rollouts at TP=tp: (loss, grad norm, reports)."""
    from functools import partial

    from qmath_megatron.config.optimizer import OptimConfig
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.convert.commands import load_hf_weights
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.rl.config import RLConfig
    from qmath_megatron.rl.loss import LOSS_KEY, grpo_forward_step
    from qmath_megatron.training.step import build_optimizer, train_step, wrap_ddp

    flavor = get_flavor("tiny-rl-toy")
    parallel, precision = ParallelConfig(tp=tp), PrecisionConfig(dtype="fp32")
    initialize(parallel, seed=5)
    config = build_transformer_config(flavor, parallel, precision, calculate_per_token_loss=True)
    padded = padded_vocab_size(flavor.vocab_size, tp)
    chunks = build_model(flavor, config, padded_vocab=padded)
    load_hf_weights(chunks, hf_dir, flavor, padded)
    optim = OptimConfig(lr=1e-3, min_lr=1e-3, clip_grad=0.0)
    ddp = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(ddp, optim, precision)
    rl = RLConfig(task="toy_half_vocab", clip_low=0.2, clip_high=0.3, tis_cap=1.5)
    n = batch["tokens"].shape[0]
    mbs = [{k: v[i : i + 4] for k, v in batch.items()} for i in range(0, n, 4)]
    result = train_step(
        ddp,
        optimizer,
        mbs,
        forward_step=partial(grpo_forward_step, flavor.vocab_size, rl),
        loss_key=LOSS_KEY,
    )
    return result.loss, result.grad_norm, result.reports

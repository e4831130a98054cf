"""GPU workers: Transformer Engine layer spec, loading CPU-converted checkpoints, FP8 steps."""

from __future__ import annotations

import torch


def te_parity_worker(hf_dir: str, ckpt: str) -> float:
    """Load a local-spec checkpoint into a TE-spec model (norm keys remapped); max |diff| vs HF."""
    from transformers import AutoModelForCausalLM

    from qmath_megatron.checkpoint.model_checkpoint import load_model, resolve_checkpoint
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.models.forward import forward_logits
    from qmath_megatron.parallel.runtime import initialize

    iter_dir, meta = resolve_checkpoint(ckpt)
    parallel = ParallelConfig()
    initialize(parallel)
    config = build_transformer_config(meta.flavor, parallel, PrecisionConfig(dtype="fp32"))
    chunks = build_model(meta.flavor, config, padded_vocab=meta.padded_vocab_size, use_te=True)
    load_model(chunks, iter_dir, meta, current_spec="te")
    tokens = torch.randint(
        0, meta.flavor.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)
    )
    ours = forward_logits([c.eval() for c in chunks], tokens)[..., : meta.flavor.vocab_size].float()
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        theirs = ref(tokens.cuda()).logits.float()
    return (ours - theirs).abs().max().item()


def fp8_steps_worker(recipe: str, steps: int) -> list[float]:
    """A few bf16 + FP8 (hybrid) AdamW steps of a small flavor on random data."""
    from qmath_megatron.config.optimizer import OptimConfig
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import build_model, build_transformer_config
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.training.step import build_optimizer, lm_microbatch, train_step, wrap_ddp

    flavor = get_flavor("qwen2.5-0.5b").replace(num_layers=4)
    parallel = ParallelConfig()
    initialize(parallel)
    precision = PrecisionConfig(dtype="bf16", fp8="hybrid", fp8_recipe=recipe)
    config = build_transformer_config(flavor, parallel, precision)
    chunks = build_model(flavor, config, use_te=True)
    optim = OptimConfig(lr=1e-3, min_lr=0.0)
    ddp = wrap_ddp(chunks, optim)
    optimizer = build_optimizer(ddp, optim, precision)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 1000, (4, 257), generator=gen).cuda()  # small id range: learnable
    return [train_step(ddp, optimizer, [lm_microbatch(data)], 256).loss for _ in range(steps)]


def weight_transfer_worker(
    flavor_dict: dict, handle, prompt: list[int], backend: str, dtype: str, sleep: bool
) -> dict:
    """A random Megatron policy (TP=1, fp32 parameters) on this rank's GPU synced twice into
    the engine behind ``handle`` with ``backend`` (ipc / nccl), sending ``dtype`` tensors;
    the engine's prompt log-probs against Megatron's before and after each sync. With
    ``sleep``, the engine sleeps (level 1) during the "training step" and wakes its weights
    for the sync and its KV cache after it, as the colocated placement does."""
    from qmath_megatron.config.parallel import ParallelConfig
    from qmath_megatron.config.precision import PrecisionConfig
    from qmath_megatron.models.builder import (
        build_model,
        build_transformer_config,
        padded_vocab_size,
    )
    from qmath_megatron.models.flavors import QwenFlavor
    from qmath_megatron.parallel.runtime import initialize
    from qmath_megatron.rl.weight_sync import WeightSync
    from tests.distributed.rl_workers import megatron_logprobs

    flavor = QwenFlavor.from_dict(flavor_dict)
    parallel = ParallelConfig()
    initialize(parallel, seed=11)
    config = build_transformer_config(flavor, parallel, PrecisionConfig(dtype="fp32"))
    chunks = build_model(flavor, config)
    padded = padded_vocab_size(flavor.vocab_size, 1)
    sync = WeightSync(
        chunks,
        flavor,
        padded,
        [handle],
        backend=backend,
        bucket_bytes=256 << 10,
        dtype=getattr(torch, dtype),
    )
    client = handle.connect()
    tokens = torch.tensor(prompt)
    out: dict = {}

    def compare(tag: str) -> None:
        ref = megatron_logprobs(chunks, flavor, tokens).cpu()
        engine = torch.tensor(client.prompt_logprobs([prompt])[0])
        out[tag] = float((engine - ref).abs().max())
        out[tag + "_version"] = client.weight_version()

    compare("before")
    stats = sync.sync()
    out["stats1"] = (stats.version, stats.bytes, stats.buckets, stats.engines)
    compare("after1")
    if sleep:
        lps = torch.tensor(client.prompt_logprobs([prompt])[0])
        greedy = client.generate([prompt], _greedy())[0][0].token_ids
        client.sleep(level=1)  # weights to host memory, KV cache dropped
        client.wake_up()
        # The same weights come back: the same log-probs and the same greedy tokens.
        out["wake_diff"] = float(
            (torch.tensor(client.prompt_logprobs([prompt])[0]) - lps).abs().max()
        )
        out["same_greedy_after_wake"] = (
            greedy == client.generate([prompt], _greedy())[0][0].token_ids
        )
        client.sleep(level=1)
    with torch.no_grad():  # a "training step" while the engine sleeps
        for chunk in chunks:
            for p in chunk.parameters():
                p.mul_(1.1).add_(0.01)
    if sleep:
        client.wake_up(tags=["weights"])  # the weights back first: the sync writes them
    stats = sync.sync()
    if sleep:
        client.wake_up(tags=["kv_cache"])
    out["stats2"] = (stats.version, stats.bytes, stats.buckets, stats.engines)
    compare("after2")
    sync.close()
    return out


def _greedy():
    from qmath_megatron.inference.engine import SamplingParams

    return SamplingParams(max_new_tokens=8)

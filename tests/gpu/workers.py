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

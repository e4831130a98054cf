"""Continued-pretraining recipes for Qwen2.5-Math on H100s, and a tiny CPU recipe.

Qwen2.5-Math was continued-pretrained from Qwen2.5 base models on ~1T math tokens at 4K
context. The report does not publish batch size or learning rates; the values here are
ours: 4M-token global batches (1024 x 4096), peak LR scaled down with model size (1e-4,
5e-5, 3e-5), 10% floor, 2,000 warmup iterations, cosine decay over the 1T-token schedule.
Parallel layouts fit 80 GB H100s with the distributed optimizer (see ``qmath train
pretrain --recipe NAME --dry-run`` for the per-GPU memory estimate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from qmath_megatron.config.job import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    SchedulerConfig,
    TrainConfig,
)
from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.config.recipes import build_recipe, recipe_registry, tiny_cpu_job
from qmath_megatron.pretrain.config import DataConfig, PretrainJob

ONE_TRILLION = 10**12


def _cpt_base(
    flavor: str,
    lr: float,
    parallel: ParallelConfig,
    fp8: bool,
    micro_batch: int,
    recompute: str,
    name: str,
) -> PretrainJob:
    precision = PrecisionConfig(
        dtype="bf16", fp8="hybrid" if fp8 else None, fp8_recipe="tensorwise" if fp8 else "delayed"
    )
    return PretrainJob(
        name=name,
        model=ModelConfig(flavor=flavor, seq_length=4096, recompute=recompute),
        parallel=parallel,
        precision=precision,
        optim=OptimConfig(
            lr=lr,
            min_lr=lr / 10,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=1.0,
            use_distributed_optimizer=True,
            overlap_grad_reduce=True,
            overlap_param_gather=True,
        ),
        scheduler=SchedulerConfig(warmup_iters=2000, decay_style="cosine"),
        data=DataConfig(
            blend=[], split="998,2,0", global_batch_size=1024, micro_batch_size=micro_batch
        ),
        checkpoint=CheckpointConfig(
            save=f"checkpoints/{name}", save_interval=1000, keep_last=3, async_save=True
        ),
        logging=LoggingConfig(log_interval=10, tensorboard_dir=f"checkpoints/{name}/tensorboard"),
        train=TrainConfig(train_tokens=ONE_TRILLION, eval_interval=2000, eval_iters=10),
    )


def qwen25_math_1p5b_cpt(fp8: bool = False) -> PretrainJob:
    """1.5B: data parallel only (fits one H100 per replica), micro batch 4."""
    return _cpt_base(
        "qwen2.5-1.5b",
        1e-4,
        ParallelConfig(tp=1, pp=1),
        fp8,
        micro_batch=4,
        recompute="none",
        name="qwen25_math_1p5b_cpt" + ("_fp8" if fp8 else ""),
    )


def qwen25_math_7b_cpt(fp8: bool = False) -> PretrainJob:
    """7B: TP=2 with sequence parallelism, selective recompute."""
    return _cpt_base(
        "qwen2.5-7b",
        5e-5,
        ParallelConfig(tp=2, pp=1, sequence_parallel=True),
        fp8,
        micro_batch=1,
        recompute="selective",
        name="qwen25_math_7b_cpt" + ("_fp8" if fp8 else ""),
    )


def qwen25_math_72b_cpt(fp8: bool = False) -> PretrainJob:
    """72B: TP=8 inside a node, PP=4 across nodes with 5 virtual stages (80 layers = 4 x 5 x 4)."""
    return _cpt_base(
        "qwen2.5-72b",
        3e-5,
        ParallelConfig(tp=8, pp=4, vpp=5, sequence_parallel=True),
        fp8,
        micro_batch=1,
        recompute="selective",
        name="qwen25_math_72b_cpt" + ("_fp8" if fp8 else ""),
    )


def qwen25_math_7b_long_context() -> PretrainJob:
    """Long-context stage from a 4K CPT checkpoint: RoPE base 1e4 -> 1e6, 4K -> 32K.

    Set ``model.init_from=<CPT checkpoint>``; context parallelism splits the 32K sequence.
    """
    job = qwen25_math_7b_cpt()
    return replace(
        job,
        name="qwen25_math_7b_long_context",
        model=replace(
            job.model,
            flavor="qwen2.5-math-7b",
            seq_length=32768,
            rope_theta=1e6,
            max_position_embeddings=32768,
            recompute="full",
            recompute_num_layers=1,
        ),
        parallel=ParallelConfig(tp=4, pp=1, cp=2, sequence_parallel=True),
        optim=replace(job.optim, lr=1e-5, min_lr=1e-6),
        scheduler=SchedulerConfig(warmup_iters=100, decay_style="cosine"),
        data=replace(job.data, global_batch_size=128),
        checkpoint=replace(
            job.checkpoint, save="checkpoints/qwen25_math_7b_long_context", save_interval=200
        ),
        train=TrainConfig(train_tokens=20 * 10**9, eval_interval=500, eval_iters=5),
    )


def tiny_cpu() -> PretrainJob:
    """Runs on a CPU in a minute: generated math corpus, the real Qwen2.5 tokenizer,
    a 2-layer model with Qwen's vocabulary, fp32, 30 steps."""
    return tiny_cpu_job(
        PretrainJob,
        "tiny_cpu",
        seq_length=128,
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.01, clip_grad=1.0),
        scheduler=SchedulerConfig(warmup_iters=3, decay_style="cosine"),
        data=DataConfig(
            global_batch_size=8, micro_batch_size=2, split="95,5,0", synthetic_documents=600
        ),
        train=TrainConfig(train_iters=30, eval_interval=10, eval_iters=1, seed=1234),
    )


RECIPES: dict[str, Callable[[], PretrainJob]] = recipe_registry(
    tiny_cpu,
    qwen25_math_1p5b_cpt,
    ("qwen25_math_1p5b_cpt_fp8", lambda: qwen25_math_1p5b_cpt(fp8=True)),
    qwen25_math_7b_cpt,
    ("qwen25_math_7b_cpt_fp8", lambda: qwen25_math_7b_cpt(fp8=True)),
    qwen25_math_72b_cpt,
    ("qwen25_math_72b_cpt_fp8", lambda: qwen25_math_72b_cpt(fp8=True)),
    qwen25_math_7b_long_context,
)


def get_recipe(name: str) -> PretrainJob:
    """The job of pretraining recipe ``name`` (KeyError listing the known ones otherwise)."""
    return build_recipe(RECIPES, name)

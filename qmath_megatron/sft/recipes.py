"""SFT recipes: chain-of-thought / tool-integrated SFT from the CPT checkpoints.

Qwen2.5 report (post-training): SFT for 2 epochs, learning rate decayed from 7e-6 to
7e-7, weight decay 0.1, gradient clipping at 1.0; Qwen2.5-Math uses 4K-context SFT data.
Not published, ours: 128 packed 4K sequences per step (~0.5M token slots), 50 warmup
steps, the parallel layouts of the CPT recipes (72B: TP=8 inside a node, PP=4 across
nodes). Micro batch 1: on GPU the packed samples go to Transformer Engine as THD with
``cu_seqlens``, one packed row per microbatch. Point ``data.prefix`` at the output of
``qmath data sft-prepare`` and ``model.init_from`` at the CPT checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

from qmath_megatron.config.job import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    SchedulerConfig,
)
from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.config.recipes import recipe_registry, tiny_cpu_job
from qmath_megatron.sft.config import SFTDataConfig, SFTJob, SFTTrainConfig


def _sft(size: str, flavor: str, parallel: ParallelConfig, recompute: str) -> SFTJob:
    name = f"qwen25_math_{size}_sft"
    return SFTJob(
        name=name,
        model=ModelConfig(
            flavor=flavor,
            seq_length=4096,
            recompute=recompute,
            init_from=f"checkpoints/qwen25_math_{size}_cpt",
        ),
        parallel=parallel,
        precision=PrecisionConfig(dtype="bf16"),
        optim=OptimConfig(
            lr=7e-6,
            min_lr=7e-7,
            weight_decay=0.1,
            clip_grad=1.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            overlap_param_gather=True,
        ),
        scheduler=SchedulerConfig(warmup_iters=50, decay_style="cosine"),
        data=SFTDataConfig(prefix=f"data/sft/{size}", global_batch_size=128, micro_batch_size=1),
        checkpoint=CheckpointConfig(
            save=f"checkpoints/{name}", save_interval=200, keep_last=3, async_save=True
        ),
        logging=LoggingConfig(log_interval=10, tensorboard_dir=f"checkpoints/{name}/tensorboard"),
        train=SFTTrainConfig(epochs=2.0),
    )


def qwen25_math_1p5b_sft() -> SFTJob:
    """1.5B: data parallel only."""
    return _sft("1p5b", "qwen2.5-1.5b", ParallelConfig(tp=1, pp=1), "none")


def qwen25_math_7b_sft() -> SFTJob:
    """7B: TP=2 with sequence parallelism, selective recompute."""
    return _sft("7b", "qwen2.5-7b", ParallelConfig(tp=2, sequence_parallel=True), "selective")


def qwen25_math_72b_sft() -> SFTJob:
    """72B: TP=8 inside a node x PP=4 across nodes (5 virtual stages: 80 = 4 x 5 x 4 layers)."""
    return _sft(
        "72b", "qwen2.5-72b", ParallelConfig(tp=8, pp=4, vpp=5, sequence_parallel=True), "selective"
    )


def tiny_cpu_sft() -> SFTJob:
    """Runs on a CPU in a minute from nothing: the real Qwen2.5 tokenizer, generated math
    conversations packed by ``sft-prepare``, the 2-layer tiny model, fp32, 30 steps over
    a small repeated set. Random init unless ``model.init_from`` (e.g. ``runs/tiny_cpu``
    after ``qmath train pretrain --recipe tiny_cpu``)."""
    return tiny_cpu_job(
        SFTJob,
        "tiny_cpu_sft",
        seq_length=256,
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.1, clip_grad=1.0),
        scheduler=SchedulerConfig(warmup_iters=3, decay_style="cosine"),
        data=SFTDataConfig(global_batch_size=8, micro_batch_size=2, synthetic_conversations=64),
        train=SFTTrainConfig(train_iters=30, epochs=None, seed=1234),
    )


RECIPES: dict[str, Callable[[], SFTJob]] = recipe_registry(
    tiny_cpu_sft, qwen25_math_1p5b_sft, qwen25_math_7b_sft, qwen25_math_72b_sft
)

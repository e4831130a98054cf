"""The reward-model recipes (``qmath train rm --recipe NAME``; the job:
:mod:`qmath_megatron.reward_model.config`).

Qwen2.5-Math-RM-72B was trained from the 72B SFT model on prompts with 6 responses each
(sampled from SFT models of several sizes, labelled by the verifier), with the listwise
loss of :mod:`qmath_megatron.reward_model.loss`. The report gives neither the learning
rate nor the batch size; the values below are ours: a small LR for a fine-tuned backbone
(5e-6 for 7B, 2e-6 for 72B, 10% floor, cosine, 3% warm-up), 256 prompts (~1,536 responses)
per step, one epoch, sequences up to 4K tokens. Layouts as the SFT recipes of the same size
(fit 80 GB H100s with the distributed optimizer).
"""

from __future__ import annotations

from collections.abc import Callable

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
from qmath_megatron.config.recipes import recipe_registry, tiny_cpu_job
from qmath_megatron.reward_model.config import RMDataConfig, RMJob


def _rm_base(
    name: str, flavor: str, init_from: str, lr: float, parallel: ParallelConfig, micro_batch: int
) -> RMJob:
    return RMJob(
        name=name,
        model=ModelConfig(
            flavor=flavor, seq_length=4096, recompute="selective", init_from=init_from
        ),
        parallel=parallel,
        precision=PrecisionConfig(dtype="bf16"),
        optim=OptimConfig(
            lr=lr,
            min_lr=lr / 10,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.95,
            clip_grad=1.0,
            use_distributed_optimizer=True,
        ),
        scheduler=SchedulerConfig(warmup_iters=20, decay_style="cosine"),
        data=RMDataConfig(
            prefix=f"data/{name}/train",
            valid_prefix=f"data/{name}/valid",
            global_batch_size=256,
            micro_batch_size=micro_batch,
            epochs=1.0,
        ),
        checkpoint=CheckpointConfig(save=f"checkpoints/{name}", save_interval=200, keep_last=2),
        logging=LoggingConfig(log_interval=1, tensorboard_dir=f"checkpoints/{name}/tensorboard"),
        train=TrainConfig(eval_interval=100, eval_iters=1),
    )


def qwen25_math_rm_7b() -> RMJob:
    """7B RM from the 7B SFT checkpoint: TP=2 + sequence parallelism."""
    return _rm_base(
        "qwen25_math_rm_7b",
        "qwen2.5-7b",
        "checkpoints/qwen25_math_7b_sft",
        5e-6,
        ParallelConfig(tp=2, pp=1, sequence_parallel=True),
        micro_batch=1,
    )


def qwen25_math_rm_72b() -> RMJob:
    """72B RM (the published Qwen2.5-Math-RM-72B size) from the 72B SFT checkpoint: TP=8, PP=4
    (80 layers: 20 per stage); the score head on the last stage."""
    return _rm_base(
        "qwen25_math_rm_72b",
        "qwen2.5-72b",
        "checkpoints/qwen25_math_72b_sft",
        2e-6,
        ParallelConfig(tp=8, pp=4, sequence_parallel=True),
        micro_batch=1,
    )


def tiny_cpu_rm() -> RMJob:
    """Runs on a CPU in about a minute from nothing: generated groups (see
    :mod:`qmath_megatron.reward_model.synthetic`), the real Qwen2.5 tokenizer, a random
    2-layer model with Qwen's vocabulary, fp32; held-out pairwise accuracy is logged."""
    return tiny_cpu_job(
        RMJob,
        "tiny_cpu_rm",
        seq_length=96,
        save_interval=30,
        keep_last=1,
        optim=OptimConfig(
            lr=2e-3, min_lr=2e-4, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=False
        ),
        scheduler=SchedulerConfig(warmup_iters=2, decay_style="cosine"),
        data=RMDataConfig(
            global_batch_size=8, micro_batch_size=4, synthetic_groups=240, synthetic_valid_groups=48
        ),
        train=TrainConfig(train_iters=30, eval_interval=30, eval_iters=1, seed=1234),
    )


RECIPES: dict[str, Callable[[], RMJob]] = recipe_registry(
    tiny_cpu_rm, qwen25_math_rm_7b, qwen25_math_rm_72b
)

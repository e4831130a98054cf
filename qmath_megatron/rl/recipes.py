"""GRPO recipes (``qmath train grpo --recipe NAME``); the job's config is ``rl/config.py``.

From the Qwen2.5-Math recipe: GRPO from the SFT model, G = 8 samples per query, the reward
``sigmoid(0.5 * r_m) + (r_v - 1)`` (``rl/reward.py``), queries filtered to 2..5 correct of 8
(``qmath data rl-prompts``). Everything else here (learning rates, prompts per step,
generation lengths, KL coefficient, clip ranges, the TIS threshold, parallel layouts and
engine placement) is ours, sized for 80 GB GPUs; check a layout with ``--dry-run``.
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
from qmath_megatron.rl.config import GRPOJob, PromptDataConfig, RLConfig


def _qwen(
    name: str,
    flavor: str,
    parallel: ParallelConfig,
    engine_tp: int,
    placement: str,
    engines: int,
    weight_transfer: str,
    gpu_memory_utilization: float,
    lr: float,
    max_new: int,
    prompts_per_step: int,
) -> GRPOJob:
    return GRPOJob(
        name=name,
        model=ModelConfig(flavor=flavor, seq_length=4096, recompute="full"),
        parallel=parallel,
        precision=PrecisionConfig(dtype="bf16"),
        optim=OptimConfig(
            lr=lr, min_lr=lr, weight_decay=0.0, clip_grad=1.0, use_distributed_optimizer=True
        ),
        scheduler=SchedulerConfig(warmup_iters=10, decay_style="constant"),
        data=PromptDataConfig(global_batch_size=prompts_per_step, micro_batch_size=4),
        rl=RLConfig(
            task="math",
            mode="cot",
            group_size=8,
            max_new_tokens=max_new,
            placement=placement,
            engines=engines,
            engine_tp=engine_tp,
            weight_transfer=weight_transfer,
            gpu_memory_utilization=gpu_memory_utilization,
            kl_coef=1e-3,
            tis_cap=2.0,
        ),
        checkpoint=CheckpointConfig(save=f"checkpoints/{name}", save_interval=20, keep_last=3),
        logging=LoggingConfig(),
        train=TrainConfig(train_iters=200),
    )


def qwen25_math_7b_grpo() -> GRPOJob:
    """7B on one 8-GPU node, colocated: trainer TP=2 x DP=4; four vLLM engines at TP=2, engine
    ``i`` on the GPUs of DP replica ``i`` (so its sender, the replica's TP rank 0, shares a
    GPU with it: CUDA IPC). The engines take 35% of each GPU while they roll out and sleep
    (level 1: weights to host memory, KV cache dropped) while the trainer steps."""
    return _qwen(
        "qwen25_math_7b_grpo",
        "qwen2.5-math-7b",
        ParallelConfig(tp=2, pp=1, dp=4),
        2,
        "colocated",
        4,
        "ipc",
        0.35,
        1e-6,
        1024,
        128,
    )


def qwen25_math_72b_grpo() -> GRPOJob:
    """72B: trainer on 8 nodes (TP=8 x PP=4 x DP=2, 64 GPUs); 8 remote vLLM engines at TP=8
    on nodes of their own (64 GPUs), synced over NCCL. The engines are started outside the
    trainer, one per node, by ``qmath engine serve --handle-dir DIR --tensor-parallel-size 8``
    (``slurm/grpo.sbatch`` does both); the trainer finds them through the handle files in
    ``rl.engine_handles`` (default ``engines``, relative to the working directory: override
    with ``rl.engine_handles=/shared/DIR``, a directory every node sees)."""
    job = _qwen(
        "qwen25_math_72b_grpo",
        "qwen2.5-math-72b",
        ParallelConfig(tp=8, pp=4, dp=2),
        8,
        "remote",
        8,
        "nccl",
        0.85,
        5e-7,
        2048,
        256,
    )
    job.rl.engine_handles = "engines"
    return job


def tiny_cpu_grpo() -> GRPOJob:
    """CPU, real vLLM: a tiny random model learns the toy task (reward 1 when the first
    sampled token is in the lower half of the vocabulary: ~50% at the start). Checkpoints
    (and the engines' random start weights) under ``runs/tiny_cpu_grpo``."""
    return tiny_cpu_job(
        GRPOJob,
        "tiny_cpu_grpo",
        seq_length=16,
        save_interval=None,  # the last step only
        model=ModelConfig(flavor="tiny-rl-toy", seq_length=16),
        optim=OptimConfig(lr=1e-2, min_lr=1e-2, weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(warmup_iters=0, decay_style="constant"),
        data=PromptDataConfig(global_batch_size=4, micro_batch_size=4, toy_prompt_tokens=8),
        rl=RLConfig(
            task="toy_half_vocab",
            group_size=8,
            max_new_tokens=1,
            placement="remote",
            weight_transfer="qmath_shm",
            bucket_mb=64,
            tis_cap=2.0,
        ),
        train=TrainConfig(train_iters=12, seed=1),
    )


# The tiny math recipe's SFT model, at the paths its docstring's commands write.
TINY_MATH_FLAVOR = "tiny-qwen-vocab-hd32"
TINY_MATH_SFT = "runs/tiny_cpu_sft_math"  # Megatron checkpoint (model.init_from)
TINY_MATH_SFT_HF = "runs/tiny_cpu_sft_math_hf"  # its HF export (rl.engine_model)


def tiny_cpu_grpo_math() -> GRPOJob:
    """CPU, real vLLM: GRPO on the math task (CoT, the shared answer checker) from a tiny
    SFT model with the Qwen vocabulary and head_dim 32 (``tiny-qwen-vocab-hd32``: vLLM's
    CPU attention refuses the 16 of ``tiny-qwen-vocab``), on generated problems of the
    kind the tiny SFT recipe trains on (``data.synthetic_problems``, written under
    ``runs/tiny_cpu_grpo_math/data/``). The SFT model comes first, at these paths::

        qmath train sft --recipe tiny_cpu_sft model.flavor=tiny-qwen-vocab-hd32 \
            checkpoint.save=runs/tiny_cpu_sft_math
        qmath convert mcore-to-hf --ckpt runs/tiny_cpu_sft_math \
            --out runs/tiny_cpu_sft_math_hf --tokenizer runs/tiny_cpu_sft_math/data/tokenizer

    (a longer SFT run, e.g. ``train.train_iters=300``, solves more of the problems: GRPO
    learns only from prompts the policy solves sometimes). Without them the run stops
    before any engine starts, naming the missing path; override ``model.init_from`` and
    ``rl.engine_model`` to use other ones."""
    return tiny_cpu_job(
        GRPOJob,
        "tiny_cpu_grpo_math",
        seq_length=256,
        save_interval=None,  # the last step only
        model=ModelConfig(flavor=TINY_MATH_FLAVOR, seq_length=256, init_from=TINY_MATH_SFT),
        optim=OptimConfig(lr=1e-4, min_lr=1e-4, weight_decay=0.0, clip_grad=1.0),
        scheduler=SchedulerConfig(warmup_iters=0, decay_style="constant"),
        # 4 prompts x 4 samples per step, 2 responses per microbatch (the logits of the
        # 151,936-token vocabulary at seq 256 are 0.3 GB per microbatch).
        data=PromptDataConfig(global_batch_size=4, micro_batch_size=2, synthetic_problems=256),
        rl=RLConfig(
            task="math",
            mode="cot",
            group_size=4,
            max_new_tokens=128,
            engine_model=TINY_MATH_SFT_HF,
            placement="remote",
            weight_transfer="qmath_shm",
            bucket_mb=64,
            tis_cap=2.0,
        ),
        train=TrainConfig(train_iters=10, seed=1),
    )


RECIPES: dict[str, Callable[[], GRPOJob]] = recipe_registry(
    qwen25_math_7b_grpo, qwen25_math_72b_grpo, tiny_cpu_grpo, tiny_cpu_grpo_math
)

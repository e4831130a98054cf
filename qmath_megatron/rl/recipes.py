"""GRPO jobs (``qmath train grpo``): the ``rl`` section and the recipes.

From the Qwen2.5-Math recipe: GRPO from the SFT model, G = 8 samples per query, the reward
``sigmoid(0.5 * r_m) + (r_v - 1)`` (``rl/reward.py``), queries filtered to 2..5 correct of 8
(``qmath data rl-prompts``). Everything else here (learning rates, prompts per step,
generation lengths, KL coefficient, clip ranges, the TIS threshold, parallel layouts and
engine placement) is ours, sized for 80 GB GPUs; check a layout with ``--dry-run``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from qmath_megatron.config.job import (
    BatchConfig,
    CheckpointConfig,
    JobConfig,
    LoggingConfig,
    ModelConfig,
    SchedulerConfig,
    TrainConfig,
)
from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.config.recipes import recipe_registry


@dataclass
class PromptDataConfig(BatchConfig):
    """``global_batch_size`` counts *prompts* per step (each sampled ``rl.group_size``
    times); ``micro_batch_size`` counts responses per microbatch (a divisor of the
    responses per DP rank)."""

    prompts: str | None = None  # JSONL of {"problem", "answer"} (qmath data rl-prompts)
    tokenizer: str | None = None  # default: the engine's model directory
    # The toy task: this many random token prompts per step, generated from the seed.
    toy_prompt_tokens: int = 8


@dataclass
class RLConfig:
    task: Literal["math", "toy_half_vocab"] = "math"
    mode: Literal["cot", "tir"] = "cot"
    group_size: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    # rollout engines
    engine_model: str | None = None  # HF directory the engines start from (the SFT model)
    # colocated: the engines share the trainer's GPUs (engine i on the launching node's
    # trainer GPUs [i * engine_tp, (i + 1) * engine_tp)) and sleep while the trainer steps;
    # remote: the engines run on engine_gpus, GPUs of the launching node the trainer does not
    # use. Each engine is its own process (rl/engines.py).
    placement: Literal["colocated", "remote"] = "colocated"
    engines: int = 1
    engine_tp: int = 1
    engine_gpus: list[int] | None = None  # remote: engines * engine_tp physical GPU ids
    # remote engines started outside the trainer (`qmath engine serve --handle-dir DIR`, on
    # other nodes): DIR, on a file system the trainer's rank 0 shares with them. Rank 0 then
    # starts no engine, waits for exactly `engines` handle files there and never stops them.
    engine_handles: str | None = None
    # How long rank 0 waits for them (the other ranks wait in a collective meanwhile: keep
    # it under the process group's 30-minute timeout).
    engine_handles_timeout_s: float = 1500.0
    # auto: qmath_shm on CPU, ipc for colocated GPUs, nccl for remote GPUs
    weight_transfer: Literal["auto", "qmath_shm", "ipc", "nccl"] = "auto"
    bucket_mb: int = 1024
    gpu_memory_utilization: float = 0.5  # of each engine GPU (colocated: shared with the trainer)
    # reward
    rm_model: str | None = None  # a reward model (qmath rm score machinery); None: r = r_v
    rm_alpha: float = 0.5
    rm_tokenizer: str | None = None  # for a Megatron RM checkpoint (default: the HF RM dir)
    rm_batch_size: int = 8
    # loss
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    reference: str | None = None  # frozen reference for the KL (default: model.init_from)
    tis_cap: float | None = 2.0
    normalize_std: bool = True
    # +1: GRPO. -1 flips every advantage: a diagnostic (the reward must then fall).
    advantage_sign: float = 1.0

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError("rl.group_size must be >= 2 (advantages are relative to the group)")
        if self.max_new_tokens < 1 or self.engines < 1 or self.engine_tp < 1 or self.bucket_mb < 1:
            raise ValueError(
                "rl.max_new_tokens, rl.engines, rl.engine_tp, rl.bucket_mb must be >= 1"
            )
        if self.temperature <= 0:
            raise ValueError("rl.temperature must be > 0 (GRPO samples)")
        if self.advantage_sign not in (1.0, -1.0):
            raise ValueError("rl.advantage_sign must be 1 or -1")
        if self.kl_coef < 0:
            raise ValueError("rl.kl_coef must be >= 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("rl.gpu_memory_utilization must be in (0, 1]")
        if self.engine_gpus and self.placement != "remote":
            raise ValueError(
                "rl.engine_gpus is for rl.placement=remote; colocated engines use "
                "the trainer's GPUs"
            )
        if self.engine_handles:
            if self.placement != "remote":
                raise ValueError(
                    "rl.engine_handles (engines started by `qmath engine serve`) "
                    "needs rl.placement=remote"
                )
            if self.engine_gpus:
                raise ValueError(
                    "rl.engine_gpus places engines the trainer starts; with "
                    "rl.engine_handles the engines are started outside it"
                )
            if self.weight_transfer == "ipc":
                raise ValueError(
                    "rl.weight_transfer=ipc cannot reach external engines "
                    "(rl.engine_handles): use nccl, qmath_shm or auto"
                )
        if self.engine_handles_timeout_s <= 0:
            raise ValueError("rl.engine_handles_timeout_s must be > 0")
        if self.weight_transfer in ("ipc", "nccl"):  # the combinations no machine can run
            from qmath_megatron.rl.engines import resolve_backend

            resolve_backend(self.weight_transfer, self.placement, on_gpu=True)


@dataclass
class GRPOJob(JobConfig):
    name: str = "grpo"
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rl: RLConfig = field(default_factory=RLConfig)


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
        checkpoint=CheckpointConfig(save_interval=20),
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
    sampled token is in the lower half of the vocabulary: ~50% at the start)."""
    return GRPOJob(
        name="tiny_cpu_grpo",
        model=ModelConfig(flavor="tiny-rl-toy", seq_length=16),
        parallel=ParallelConfig(tp=1, pp=1),
        precision=PrecisionConfig(dtype="fp32"),
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
        checkpoint=CheckpointConfig(save_interval=None),
        logging=LoggingConfig(),
        train=TrainConfig(train_iters=12, seed=1),
    )


RECIPES: dict[str, Callable[[], GRPOJob]] = recipe_registry(
    qwen25_math_7b_grpo, qwen25_math_72b_grpo, tiny_cpu_grpo
)

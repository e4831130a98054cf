"""The GRPO job's configuration (``qmath train grpo``): the prompts (``data``) and the
``rl`` section: task and reward, sampling, rollout engines, weight transfer and the loss.

Recipes (``rl/recipes.py``) build these; YAML files and ``key.sub=value`` overrides edit
them (type-checked by :mod:`qmath_megatron.config.overrides`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qmath_megatron.config.job import BatchConfig, JobConfig
from qmath_megatron.config.overrides import RESUME_SAFE
from qmath_megatron.inference.sampling import SamplingConfig
from qmath_megatron.rl.engines import resolve_weight_transfer
from qmath_megatron.rl.reward import get_reward

# The rollouts' sampling settings under their rl.* names (rl.group_size samples per prompt).
RL_SAMPLING_KEYS = {
    "n": "rl.group_size",
    "temperature": "rl.temperature",
    "top_p": "rl.top_p",
    "max_new_tokens": "rl.max_new_tokens",
}


@dataclass
class PromptDataConfig(BatchConfig):
    """``global_batch_size`` counts *prompts* per step (each sampled ``rl.group_size``
    times); ``micro_batch_size`` counts responses per microbatch (a divisor of the
    responses per DP rank)."""

    prompts: str | None = None  # JSONL of {"problem", "answer"} (qmath data rl-prompts)
    # Counts the prompts' tokens before the engines start; default: rl.engine_model.
    tokenizer: str | None = None
    # The toy task: this many random token prompts per step, generated from the seed.
    toy_prompt_tokens: int = 8
    # Without data.prompts: this many generated math problems (the tiny SFT recipe's kind,
    # rl/prepare.py), written under checkpoint.save/data/. 0: data.prompts is required.
    synthetic_problems: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.toy_prompt_tokens < 1 or self.synthetic_problems < 0:
            raise ValueError("data.toy_prompt_tokens must be >= 1, data.synthetic_problems >= 0")


@dataclass
class RLConfig:
    # What the policy learns and how it is rewarded: a name registered in rl/reward.py
    # (math: problems from data.prompts, the answer checker; toy_half_vocab: the toy task).
    task: str = "math"
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
    # The rollout-engine layout (where engines run, how many, how weights reach them) is
    # resume-safe (RESUME_SAFE): the same optimizer steps whichever engines sample them.
    placement: Literal["colocated", "remote"] = field(default="colocated", metadata=RESUME_SAFE)
    engines: int = field(default=1, metadata=RESUME_SAFE)
    engine_tp: int = field(default=1, metadata=RESUME_SAFE)
    # remote: engines * engine_tp physical GPU ids
    engine_gpus: list[int] | None = field(default=None, metadata=RESUME_SAFE)
    # remote engines started outside the trainer (`qmath engine serve --handle-dir DIR`, on
    # other nodes): DIR, on a file system the trainer's rank 0 shares with them. Rank 0 then
    # starts no engine, waits for exactly `engines` handle files there and never stops them.
    engine_handles: str | None = field(default=None, metadata=RESUME_SAFE)
    # How long rank 0 waits for them (the other ranks wait in a collective meanwhile: keep
    # it under the process group's 30-minute timeout).
    engine_handles_timeout_s: float = field(default=1500.0, metadata=RESUME_SAFE)
    # auto: qmath_shm on CPU, ipc for colocated GPUs, nccl for remote GPUs
    weight_transfer: Literal["auto", "qmath_shm", "ipc", "nccl"] = field(
        default="auto", metadata=RESUME_SAFE
    )
    bucket_mb: int = field(default=1024, metadata=RESUME_SAFE)
    # of each engine GPU (colocated: shared with the trainer)
    gpu_memory_utilization: float = field(default=0.5, metadata=RESUME_SAFE)
    # reward
    rm_model: str | None = None  # a reward model (qmath rm score machinery); None: r = r_v
    rm_alpha: float = 0.5
    rm_tokenizer: str | None = None  # for a Megatron RM checkpoint (default: the HF RM dir)
    rm_batch_size: int = field(default=8, metadata=RESUME_SAFE)  # the same scores, batched
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
        get_reward(self.task)  # an unknown rl.task lists the registered ones
        if self.group_size < 2:
            raise ValueError("rl.group_size must be >= 2 (advantages are relative to the group)")
        self.sampling()  # the shared sampling checks, in rl.* names
        if self.engines < 1 or self.engine_tp < 1 or self.bucket_mb < 1:
            raise ValueError("rl.engines, rl.engine_tp, rl.bucket_mb must be >= 1")
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
            resolve_weight_transfer(self.weight_transfer, self.placement, on_gpu=True)

    def sampling(self) -> SamplingConfig:
        """The rollouts' sampling: ``rl.group_size`` responses per prompt (the seed is set
        per step from ``train.seed``)."""
        return SamplingConfig.from_keys(
            RL_SAMPLING_KEYS,
            n=self.group_size,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
        )


@dataclass
class GRPOJob(JobConfig):
    name: str = "grpo"
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rl: RLConfig = field(default_factory=RLConfig)

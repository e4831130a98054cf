"""The configuration of a pretraining job: one small dataclass per component.

Recipes (:mod:`qmath_megatron.recipes`) are Python functions returning a
:class:`PretrainJob`; ``key.sub=value`` overrides and YAML files
(:mod:`qmath_megatron.config.overrides`) edit it, type-checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig


@dataclass
class ModelConfig:
    flavor: str = "tiny-qwen-vocab"
    seq_length: int = 4096
    # Long-context stages raise the RoPE base and the position limit (None: the flavor's).
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_num_layers: int = 1  # full recompute: layers per recompute block
    # Megatron checkpoint (e.g. from `qmath convert hf-to-mcore`) to start from: model weights
    # only; optimizer, scheduler and data position start fresh. Ignored when resuming.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError("model.seq_length must be >= 1")


@dataclass
class DataConfig:
    # Megatron blend: ["prefixA"] or ["0.7", "prefixA", "0.3", "prefixB"] (weights, prefixes).
    blend: list[str] = field(default_factory=list)
    split: str = "99,1,0"
    tokenizer: str | None = None  # local HF tokenizer directory
    global_batch_size: int = 8
    micro_batch_size: int = 1
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    cache_dir: str | None = None
    # When > 0 and the blend is empty: build the Qwen2.5 tokenizer and this many generated
    # math documents, tokenize them, and train on that (the CPU demo recipes).
    synthetic_documents: int = 0

    def __post_init__(self) -> None:
        if self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("data.global_batch_size and data.micro_batch_size must be >= 1")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"data.global_batch_size {self.global_batch_size} is not a multiple of "
                f"data.micro_batch_size {self.micro_batch_size}"
            )


@dataclass
class SchedulerConfig:
    warmup_iters: int = 0
    decay_style: Literal["cosine", "linear", "constant", "WSD"] = "cosine"
    decay_iters: int | None = None  # default: the whole run
    wsd_decay_fraction: float = 0.1  # WSD: the final fraction of decay_iters spent decaying
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"


@dataclass
class CheckpointConfig:
    save: str | None = None  # checkpoint root; also the resume source when `load` is None
    save_interval: int | None = None
    load: str | None = None
    keep_last: int | None = None  # keep this many newest iterations (None: all)
    async_save: bool = False  # GPU only (megatron's async torch_dist writer)
    # Optimizer-state layout: "dp_reshardable" saves/loads fully in parallel and allows a
    # different DP size on resume; "fully_reshardable" also allows changing TP/PP (it
    # gathers the state on DP rank 0 while saving).
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"


@dataclass
class LoggingConfig:
    log_interval: int = 1
    jsonl: str | None = None  # default: <checkpoint.save>/metrics.jsonl
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # online needs a key
    peak_tflops: float | None = None  # per device; default from the GPU model and precision


@dataclass
class TrainConfig:
    train_iters: int | None = None
    train_tokens: int | None = None  # alternative: iterations = tokens / (global batch x seq)
    eval_interval: int | None = None
    eval_iters: int = 1
    seed: int = 1234
    exit_after_iters: int | None = None  # stop (after saving) at this iteration
    skip_nonfinite: bool = True  # skip steps with NaN/inf loss or grad norm
    max_consecutive_nonfinite: int = 3  # then stop with a clear message


@dataclass
class PretrainJob:
    name: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def total_iters(self) -> int:
        if self.train.train_iters is not None:
            return self.train.train_iters
        if self.train.train_tokens is not None:
            per_iter = self.data.global_batch_size * self.model.seq_length
            return -(-self.train.train_tokens // per_iter)
        raise ValueError("set train.train_iters or train.train_tokens")

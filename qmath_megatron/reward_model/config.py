"""The reward-model job: the shared sections plus the grouped data of ``qmath data
rm-prepare``."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmath_megatron.config.job import BatchConfig, JobConfig


@dataclass
class RMDataConfig(BatchConfig):
    """Batch sizes count *prompts* (groups): a microbatch holds ``micro_batch_size`` whole
    groups; ``global_batch_size`` groups make a step."""

    prefix: str | None = None  # `qmath data rm-prepare` output
    valid_prefix: str | None = None  # held-out groups (evaluation)
    tokenizer: str | None = None  # needed only to build synthetic data
    # > 0 and no prefix: generate this many train groups (and synthetic_valid_groups
    # held-out ones) with the Qwen2.5 tokenizer under <checkpoint.save>/data (CPU recipe).
    synthetic_groups: int = 0
    synthetic_valid_groups: int = 0
    epochs: float | None = None  # steps = epochs x groups / global batch (if train_iters unset)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synthetic_groups < 0 or self.synthetic_valid_groups < 0:
            raise ValueError("data.synthetic_groups/synthetic_valid_groups must be >= 0")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"data.epochs must be > 0, got {self.epochs}")


@dataclass
class RMJob(JobConfig):
    name: str = "rm"
    data: RMDataConfig = field(default_factory=RMDataConfig)

"""The configuration of an SFT job: the common sections plus a packed dataset."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmath_megatron.config.job import BatchConfig, JobConfig, TrainConfig


@dataclass
class SFTDataConfig(BatchConfig):
    """Global/micro batch sizes count *packed sequences* (of ``model.seq_length`` slots)."""

    # Packed dataset from `qmath data sft-prepare` (PREFIX.bin/.idx, PREFIX.loss_mask.*,
    # PREFIX.report.json); its seq length must be <= model.seq_length.
    prefix: str | None = None
    valid_prefix: str | None = None  # optional held-out packed dataset (val_loss)
    shuffle: bool = True  # a new permutation of the packed sequences every epoch (train.seed)
    # When > 0 and prefix is empty: build the Qwen2.5 tokenizer and this many generated math
    # conversations under <checkpoint.save>/data, pack them, and train on that (CPU recipe).
    synthetic_conversations: int = 0
    tokenizer: str | None = None  # for synthetic data (default: built under the work dir)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synthetic_conversations < 0:
            raise ValueError("data.synthetic_conversations must be >= 0")


@dataclass
class SFTTrainConfig(TrainConfig):
    # Run length in passes over the packed dataset (used when train.train_iters is unset).
    epochs: float | None = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0, got {self.epochs}")


@dataclass
class SFTJob(JobConfig):
    name: str = "sft"
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)

    def total_iters(self) -> int:
        if self.train.train_iters is not None or self.train.train_tokens is not None:
            return super().total_iters()
        raise ValueError(
            "SFT run length: set train.train_iters, or train.epochs with a dataset "
            "(the SFT task computes the steps from the packed dataset's size)"
        )

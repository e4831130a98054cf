"""The pretraining job: the shared sections plus a Megatron ``GPTDataset`` blend."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmath_megatron.config.job import BatchConfig, JobConfig
from qmath_megatron.config.overrides import RESUME_SAFE


@dataclass
class DataConfig(BatchConfig):
    # Megatron blend: ["prefixA"] or ["0.7", "prefixA", "0.3", "prefixB"] (weights, prefixes).
    blend: list[str] = field(default_factory=list)
    split: str = "99,1,0"
    tokenizer: str | None = None  # local HF tokenizer directory
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    cache_dir: str | None = field(default=None, metadata=RESUME_SAFE)  # index cache: resume-safe
    # When > 0 and the blend is empty: build the Qwen2.5 tokenizer and this many generated
    # math documents, tokenize them, and train on that (the CPU demo recipes).
    synthetic_documents: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.synthetic_documents < 0:
            raise ValueError("data.synthetic_documents must be >= 0")


@dataclass
class PretrainJob(JobConfig):
    name: str = "pretrain"
    data: DataConfig = field(default_factory=DataConfig)

"""The configuration of an evaluation run: one small dataclass per component."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qmath_megatron.evaluation.prompts import MODES
from qmath_megatron.evaluation.tir import TIRConfig
from qmath_megatron.inference import sampling
from qmath_megatron.sandbox import SandboxConfig


@dataclass
class EvalModelConfig:
    path: str  # HF directory or qmath Megatron checkpoint (converted to HF first)
    tokenizer: str | None = None  # needed for Megatron checkpoints (they hold no tokenizer)
    engine: str = "auto"  # auto | vllm | transformers
    batch_size: int = 8  # transformers engine: prompts per generate call
    dtype: str = "float32"  # transformers engine (CPU); vLLM uses the checkpoint's dtype
    tensor_parallel_size: int = 1  # vLLM
    gpu_memory_utilization: float = 0.9  # vLLM
    max_model_len: int | None = None  # vLLM

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tensor_parallel_size < 1:
            raise ValueError("model.batch_size and model.tensor_parallel_size must be >= 1")


@dataclass
class EvalSamplingConfig(sampling.SamplingConfig):
    """The shared sampling settings (:mod:`qmath_megatron.inference.sampling`) plus the
    evaluation's extra greedy pass."""

    greedy: bool = True  # with temperature > 0: also decode greedily, for the greedy metric


# The name the eval job's sampling section is imported by (``SamplingConfig(greedy=...)``).
SamplingConfig = EvalSamplingConfig


@dataclass
class CheckConfig:
    workers: int = 2  # answer-checking processes
    timeout_s: float = 10.0  # hard wall-clock limit per check (a hang scores as wrong)


RM_ENGINES = ("transformers", "vllm")


@dataclass
class EvalRMConfig:
    """The reward model that scores every completion for rm@k (none: no rm@k)."""

    path: str | None = None  # HF Qwen2ForRewardModel directory or Megatron RM checkpoint
    tokenizer: str | None = None  # default: the RM's own, else model.tokenizer
    batch_size: int = 8  # sequences per reward-model pass
    engine: str = "transformers"  # an HF RM: plain PyTorch or vLLM's Qwen2ForRewardModel

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"rm.batch_size must be >= 1, got {self.batch_size}")
        if self.engine not in RM_ENGINES:
            raise ValueError(f"rm.engine {self.engine!r} is not one of {', '.join(RM_ENGINES)}")


@dataclass
class EvalJob:
    model: EvalModelConfig
    benchmarks: list[str]
    output: str = "eval_out"
    modes: list[str] = field(default_factory=lambda: ["cot"])
    benchmark_dir: str | None = None
    benchmark_specs: list[str] = field(default_factory=list)
    limit: int | None = None  # first N problems of each benchmark
    k: int | None = None  # metrics@k; default: sampling.n
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    tir: TIRConfig = field(default_factory=TIRConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    rm: EvalRMConfig = field(default_factory=EvalRMConfig)
    overwrite: bool = False  # regenerate instead of reusing finished benchmark/mode outputs

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("no benchmarks to evaluate (--benchmarks gsm8k,math500)")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown evaluation mode(s) {bad} (choose from {', '.join(MODES)})")
        if self.limit is not None and self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.k is not None and not 1 <= self.k <= self.sampling.n:
            raise ValueError(
                f"k={self.k} must be between 1 and the number of samples n={self.sampling.n}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

"""The configuration of a training job: one small dataclass per component.

Every stage's job shares the common sections of :class:`JobConfig` (model, parallel,
precision, optim, scheduler, checkpoint, logging, train) and adds its own: pretraining
(:mod:`qmath_megatron.pretrain.config`) its ``data`` blend, SFT (:mod:`qmath_megatron.sft.config`)
its packed dataset, and so on. A stage's ``data`` section subclasses :class:`BatchConfig`
(global and micro batch sizes), which the shared loop reads.

Recipes (``recipes.py`` beside each stage) are Python functions returning a job;
``key.sub=value`` overrides and YAML files (:mod:`qmath_megatron.config.overrides`) edit
it, type-checked. Values are validated when a section is built (``__post_init__``), so
an override such as ``checkpoint.save_interval=-1`` fails before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.overrides import RESUME_SAFE
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig


@dataclass
class ModelConfig:
    flavor: str = "tiny-qwen-vocab"
    seq_length: int = 4096
    # Long-context stages raise the RoPE base and the position limit (None: the flavor's).
    rope_theta: float | None = None
    max_position_embeddings: int | None = None
    # Resume-safe (RESUME_SAFE): the same steps, computed with less memory.
    recompute: Literal["none", "selective", "full"] = field(default="none", metadata=RESUME_SAFE)
    # full recompute: layers per recompute block
    recompute_num_layers: int = field(default=1, metadata=RESUME_SAFE)
    # Megatron checkpoint (e.g. from `qmath convert hf-to-mcore`) to start from: model weights
    # only; optimizer, scheduler and data position start fresh. Ignored when resuming.
    init_from: str | None = field(default=None, metadata=RESUME_SAFE)

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ValueError("model.seq_length must be >= 1")


def _at_least(section: str, obj: object, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raise ValueError for any of ``names`` that is set (not None) and below ``minimum``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum} (or null), got {value}")


@dataclass
class BatchConfig:
    """What the shared loop needs of every stage's ``data`` section."""

    global_batch_size: int = 8
    micro_batch_size: int = field(default=1, metadata=RESUME_SAFE)  # the same global batch

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

    def __post_init__(self) -> None:
        _at_least("scheduler", self, ("warmup_iters",), 0)
        _at_least("scheduler", self, ("decay_iters",))
        if not 0 <= self.wsd_decay_fraction <= 1:
            raise ValueError(
                f"scheduler.wsd_decay_fraction must be in [0, 1], got {self.wsd_decay_fraction}"
            )


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
    # Resuming with settings that change the run's meaning (learning rates, schedule, batch
    # size, sequence length, seed, data) is refused with a list of what changed; true
    # resumes anyway with the new values (a warning lists them; the LR schedule takes the
    # new values, as Megatron-LM's --override-opt_param-scheduler). See training/resume.py.
    allow_changed_settings: bool = False

    def __post_init__(self) -> None:
        _at_least("checkpoint", self, ("save_interval", "keep_last"))
        for name in ("save", "load"):
            if getattr(self, name) == "":
                raise ValueError(f"checkpoint.{name} must be a directory or null, not empty")


@dataclass
class LoggingConfig:
    log_interval: int = 1
    jsonl: str | None = None  # default: <checkpoint.save>/metrics.jsonl
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # online needs a key
    peak_tflops: float | None = None  # per device; default from the GPU model and precision

    def __post_init__(self) -> None:
        _at_least("logging", self, ("log_interval",))


@dataclass
class TrainConfig:
    train_iters: int | None = None
    train_tokens: int | None = None  # alternative: iterations = tokens / (global batch x seq)
    # Resume-safe (RESUME_SAFE): eval cadence, when to stop, the non-finite-step policy.
    eval_interval: int | None = field(default=None, metadata=RESUME_SAFE)
    eval_iters: int = field(default=1, metadata=RESUME_SAFE)
    seed: int = 1234
    # stop (after saving) at this iteration
    exit_after_iters: int | None = field(default=None, metadata=RESUME_SAFE)
    # skip steps with NaN/inf loss or grad norm, then stop with a clear message after this many
    skip_nonfinite: bool = field(default=True, metadata=RESUME_SAFE)
    max_consecutive_nonfinite: int = field(default=3, metadata=RESUME_SAFE)
    # Preemption (Slurm sends SIGTERM; SIGUSR1/SIGUSR2 when configured with --signal) and
    # Ctrl-C (SIGINT): on any of these signals every rank finishes its step, all agree at the
    # step boundary, save a checkpoint and exit 0 (Megatron-LM's exit signal handler). A
    # second SIGINT aborts at once.
    exit_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGINT"], metadata=RESUME_SAFE
    )
    # Save and exit once this much wall-clock time has passed since start-up (time limits).
    exit_duration_minutes: float | None = field(default=None, metadata=RESUME_SAFE)

    def __post_init__(self) -> None:
        _at_least(
            "train",
            self,
            (
                "train_iters",
                "train_tokens",
                "eval_interval",
                "eval_iters",
                "exit_after_iters",
                "max_consecutive_nonfinite",
            ),
        )
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            raise ValueError(
                f"train.exit_duration_minutes must be > 0, got {self.exit_duration_minutes}"
            )
        allowed = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
        bad = [s for s in self.exit_signals if s not in allowed]
        if bad:
            raise ValueError(f"train.exit_signals: {bad} not among {list(allowed)}")


@dataclass
class JobConfig:
    """The sections every stage shares; a stage's job subclasses it and adds ``data`` (a
    :class:`BatchConfig`) and any sections of its own.

    Fields and sections marked :data:`~qmath_megatron.config.overrides.RESUME_SAFE` may
    change when a run resumes (:mod:`qmath_megatron.training.resume`): the job's name, the
    parallel layout (checkpoints reshard), logging, checkpoint cadence and paths."""

    name: str = field(default="job", metadata=RESUME_SAFE)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=RESUME_SAFE)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=RESUME_SAFE)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=RESUME_SAFE)
    train: TrainConfig = field(default_factory=TrainConfig)

    def total_iters(self) -> int:
        if self.train.train_iters is not None:
            return self.train.train_iters
        if self.train.train_tokens is not None:
            per_iter = self.data.global_batch_size * self.model.seq_length
            return -(-self.train.train_tokens // per_iter)
        raise ValueError("set train.train_iters or train.train_tokens")

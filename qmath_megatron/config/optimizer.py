"""Optimizer settings (AdamW through Megatron's distributed optimizer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmath_megatron.config.overrides import RESUME_SAFE


@dataclass
class OptimConfig:
    """AdamW + gradient clipping. Named ``OptimConfig`` to stay distinct from Megatron's
    ``OptimizerConfig``, which :func:`qmath_megatron.training.step.build_optimizer` fills."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # Overlapping the DP all-reduce with backward only pays off (and is only supported) on GPU.
    # Resume-safe (RESUME_SAFE): the same steps, communicated differently.
    overlap_grad_reduce: bool = field(default=True, metadata=RESUME_SAFE)
    overlap_param_gather: bool = field(default=False, metadata=RESUME_SAFE)

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                "need 0 <= optim.min_lr <= optim.lr and lr > 0 "
                f"(lr={self.lr}, min_lr={self.min_lr})"
            )
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError("optim.adam_beta1/adam_beta2 must be in [0, 1)")
        if self.clip_grad < 0:
            raise ValueError("optim.clip_grad must be >= 0 (0 disables clipping)")

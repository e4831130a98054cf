"""Continued pretraining on Megatron-Core: ``qmath train pretrain``.

The loop is the shared one (:mod:`qmath_megatron.training.loop`); pretraining is its
:class:`~qmath_megatron.training.tasks.pretrain.PretrainTask`. The helpers below stay
importable from here for the code and tests that used them.
"""

from __future__ import annotations

from qmath_megatron.config.job import PretrainJob
from qmath_megatron.training.loop import build_scheduler, job_flavor, recompute_kwargs

__all__ = ["build_scheduler", "job_flavor", "pretrain", "recompute_kwargs"]


def pretrain(job: PretrainJob) -> list[dict]:
    """Train; returns the logged metrics of this process (rank 0 logs all of them)."""
    from qmath_megatron.training.loop import train
    from qmath_megatron.training.tasks.pretrain import PretrainTask

    return train(job, PretrainTask(job))

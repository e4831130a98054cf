"""Continued pretraining as a task: Megatron ``GPTDataset`` blends, LM loss, val loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qmath_megatron.pretrain.config import PretrainJob
from qmath_megatron.pretrain.data import (
    build_datasets,
    global_batch_microbatches,
    parse_blend,
    prepare_synthetic_data,
)
from qmath_megatron.pretrain.recipes import RECIPES
from qmath_megatron.training.loop import train
from qmath_megatron.training.resume import dataset_fingerprint
from qmath_megatron.training.task import Stage, Task, TrainContext


class PretrainTask(Task):
    """GPT LM on a (weighted) blend of indexed datasets; the loss is Megatron-LM's mean of
    per-microbatch token means (``calculate_per_token_loss=False``), as before the loop
    was shared."""

    name = "pretrain"
    job: PretrainJob

    def prepare(self, ctx: TrainContext) -> PretrainJob:
        """Build the generated corpus of the CPU recipes (rank 0; others wait)."""
        import torch.distributed as dist

        job = self.job
        if job.data.blend or job.data.synthetic_documents <= 0:
            return job
        if not job.checkpoint.save:
            raise ValueError("synthetic data needs checkpoint.save (its work directory)")
        workdir = Path(job.checkpoint.save) / "data"
        if ctx.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            data = prepare_synthetic_data(job.data, workdir)
        dist.barrier()
        if not ctx.is_main:
            data = prepare_synthetic_data(job.data, workdir)  # finds what rank 0 built
        return replace(job, data=data)

    def data_fingerprint(self) -> dict[str, Any]:
        prefixes = parse_blend(self.job.data.blend)[0] if self.job.data.blend else []
        return {
            f"data.blend prefix {p}": dataset_fingerprint(p, (".idx", ".bin")) for p in prefixes
        }

    def setup(self, ctx: TrainContext) -> None:
        job = self.job
        total, gbs, t = job.total_iters(), job.data.global_batch_size, job.train
        valid = t.eval_iters * gbs * (total // t.eval_interval + 1) if t.eval_interval else 0
        self.datasets = build_datasets(job.data, job.model.seq_length, t.seed, total * gbs, valid)

    def microbatches(self, ctx: TrainContext, state: Any) -> list[dict]:
        d = self.job.data
        return global_batch_microbatches(
            self.datasets.train,
            state.consumed_samples,
            d.global_batch_size,
            d.micro_batch_size,
            ctx.dp_rank,
            ctx.dp_size,
        )

    def validation_microbatches(self, ctx: TrainContext, state: Any) -> list[dict] | None:
        """The ``eval_iters`` validation global batches of this evaluation (each evaluation
        reads the next ones); the base class reports their mean LM loss as ``val_loss``
        (Megatron-LM's mean of microbatch means, as in training)."""
        if self.datasets.valid is None:
            return None
        job, d = self.job, self.job.data
        first = state.iteration // job.train.eval_interval * job.train.eval_iters
        mbs = []
        for i in range(job.train.eval_iters):
            mbs += global_batch_microbatches(
                self.datasets.valid,
                (first + i) * d.global_batch_size,
                d.global_batch_size,
                d.micro_batch_size,
                ctx.dp_rank,
                ctx.dp_size,
            )
        return mbs


STAGE = Stage(
    name="pretrain",
    help="continued pretraining on Megatron-Core",
    task=PretrainTask,
    job_type=PretrainJob,
    recipes=RECIPES,
)


def pretrain(job: PretrainJob) -> list[dict]:
    """Train ``job`` on the shared loop; returns this process's logged metrics (rank 0 logs
    all of them)."""
    return train(job, PretrainTask(job))

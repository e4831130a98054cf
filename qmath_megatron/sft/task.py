"""Supervised fine-tuning as a task: packed, loss-masked chat samples, token-mean loss.

Data: a packed dataset from ``qmath data sft-prepare`` (:class:`PackedSFTDataset`); step
``k`` trains on packed sequences ``[k * G, (k + 1) * G)`` of the sample stream, where
epoch ``e`` is a permutation of the dataset seeded by ``(train.seed, e)`` (or the stored
order with ``data.shuffle=false``). The position is the checkpointed
``consumed_samples``, so a resumed run sees exactly the batches it would have.

Loss: the mean over the loss-masked (assistant) tokens of the whole global batch, as
Megatron-LM's SFT: every token weighs the same, so long samples count by their length
(``calculate_per_token_loss``: loss sums and token counts are summed over microbatches and
DP/CP ranks before dividing). Attention stays within each sample: on CPU an explicit
block-diagonal causal mask; on GPU with Transformer Engine, ``PackedSeqParams`` (THD,
``cu_seqlens``; one packed row per microbatch).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from qmath_megatron.data.synthetic import generate_problems
from qmath_megatron.models.builder import transformer_engine_available
from qmath_megatron.sft.config import SFTJob
from qmath_megatron.sft.dataset import (
    LOSS_MASK_SUFFIX,
    PackedSFTDataset,
    packed_microbatch,
)
from qmath_megatron.sft.prepare import SFTPrepareConfig, prepare_sft
from qmath_megatron.sft.recipes import RECIPES
from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer
from qmath_megatron.training.resume import dataset_fingerprint
from qmath_megatron.training.step import lm_forward_step
from qmath_megatron.training.task import Stage, Task, TrainContext


def write_synthetic_conversations(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` generated math problems as chat JSONL (user problem, assistant worked solution)."""
    with path.open("w", encoding="utf-8") as f:
        for row in generate_problems(n, seed):
            messages = [
                {"role": "user", "content": row["problem"]},
                {"role": "assistant", "content": row["solution"]},
            ]
            f.write(json.dumps({"id": row["id"], "messages": messages}) + "\n")
    return path


def prepare_synthetic_sft(job: SFTJob, workdir: Path) -> SFTJob:
    """Tokenizer + generated conversations packed at ``model.seq_length`` (idempotent)."""
    tok_dir = Path(job.data.tokenizer) if job.data.tokenizer else workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_qwen25_tokenizer(tok_dir, overwrite=True)
    prefix = workdir / "synthetic_sft"
    if not Path(f"{prefix}.report.json").is_file():
        source = write_synthetic_conversations(
            workdir / "synthetic_sft.jsonl", job.data.synthetic_conversations
        )
        prepare_sft(
            SFTPrepareConfig(
                inputs=[str(source)],
                output_prefix=str(prefix),
                tokenizer=str(tok_dir),
                seq_length=job.model.seq_length,
                overwrite=True,
            )
        )
    return replace(job, data=replace(job.data, prefix=str(prefix), tokenizer=str(tok_dir)))


def _sequences(prefix: str) -> int | None:
    """Packed sequences in a dataset, from its report (no index opened); None if absent."""
    path = Path(f"{prefix}.report.json")
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["sequences"])


class SFTTask(Task):
    name = "sft"
    calculate_per_token_loss = True
    job: SFTJob

    def prepare(self, ctx: TrainContext) -> SFTJob:
        import torch.distributed as dist

        job = self.job
        if job.data.prefix:
            return job
        if job.data.synthetic_conversations <= 0:
            raise ValueError("set data.prefix to a packed dataset from `qmath data sft-prepare`")
        if not job.checkpoint.save:
            raise ValueError("synthetic SFT data needs checkpoint.save (its work directory)")
        workdir = Path(job.checkpoint.save) / "data"
        if ctx.is_main:
            workdir.mkdir(parents=True, exist_ok=True)
            job = prepare_synthetic_sft(job, workdir)
        dist.barrier()
        return job if ctx.is_main else prepare_synthetic_sft(job, workdir)  # finds rank 0's

    def data_fingerprint(self) -> dict[str, Any]:
        # Not the report: it holds the preparation's wall time, different for the same data.
        m = LOSS_MASK_SUFFIX
        suffixes = (".idx", ".bin", f"{m}.idx", f"{m}.bin")
        d = self.job.data
        return {
            f"data.{key} {prefix}": dataset_fingerprint(prefix, suffixes)
            for key, prefix in (("prefix", d.prefix), ("valid_prefix", d.valid_prefix))
            if prefix
        }

    def setup(self, ctx: TrainContext) -> None:
        job = self.job
        if job.parallel.cp > 1:
            raise ValueError(
                "packed SFT sequences with context parallelism are not supported; use parallel.cp=1"
            )
        self.train_set = PackedSFTDataset(job.data.prefix)
        self.valid_set = PackedSFTDataset(job.data.valid_prefix) if job.data.valid_prefix else None
        for ds in filter(None, (self.train_set, self.valid_set)):
            if ds.seq_length > job.model.seq_length:
                raise ValueError(
                    f"{ds.prefix} was packed at seq length {ds.seq_length} > model.seq_length "
                    f"{job.model.seq_length}; repack or raise model.seq_length"
                )
        if len(self.train_set) == 0:
            raise ValueError(f"{job.data.prefix}: no packed sequences")
        self.thd = transformer_engine_available()
        if self.thd and job.data.micro_batch_size != 1:
            raise ValueError(
                "packed SFT on GPU (THD) needs data.micro_batch_size=1 "
                "(one packed row per microbatch)"
            )
        self._perm: tuple[int, np.ndarray] | None = None

    def total_iters(self) -> int:
        return self._iters(self.job, len(self.train_set))

    @staticmethod
    def _iters(job: SFTJob, sequences: int | None) -> int:
        if (
            job.train.train_iters is not None
            or job.train.train_tokens is not None
            or job.train.epochs is None
        ):
            return job.total_iters()
        if sequences is None:
            raise ValueError("unknown dataset size")
        return max(1, math.ceil(job.train.epochs * sequences / job.data.global_batch_size))

    @classmethod
    def planned_iters(cls, job: SFTJob) -> int | None:
        try:
            return cls._iters(job, _sequences(job.data.prefix) if job.data.prefix else None)
        except ValueError:
            return None

    def _sample(self, i: int) -> int:
        """Dataset index of the ``i``-th packed sequence of the (epoch-shuffled) stream."""
        n = len(self.train_set)
        epoch, pos = divmod(i, n)
        if not self.job.data.shuffle:
            return pos
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.job.train.seed, epoch]).permutation(n))
        return int(self._perm[1][pos])

    def _batches(self, dataset, indices: list[int]) -> list[dict]:
        mbs, micro = [], self.job.data.micro_batch_size
        for k in range(0, len(indices), micro):
            items = [dataset[i] for i in indices[k : k + micro]]
            mbs.append(
                packed_microbatch(
                    items, self.job.model.seq_length, dataset.pad_id, attention_mask=not self.thd
                )
            )
        return mbs

    def _rank_share(self, ctx: TrainContext, start: int) -> list[int]:
        gbs = self.job.data.global_batch_size
        if gbs % (self.job.data.micro_batch_size * ctx.dp_size):
            raise ValueError(
                f"global batch {gbs} is not divisible by micro batch "
                f"{self.job.data.micro_batch_size} x DP {ctx.dp_size}"
            )
        per_rank = gbs // ctx.dp_size
        first = start + ctx.dp_rank * per_rank
        return list(range(first, first + per_rank))

    def microbatches(self, ctx: TrainContext, state: Any) -> list[dict]:
        share = self._rank_share(ctx, state.consumed_samples)
        return self._batches(self.train_set, [self._sample(i) for i in share])

    def forward_step(self, batch: dict, model: Any):
        if self.thd:
            from megatron.core.packed_seq_params import PackedSeqParams

            cu, m = batch["cu_seqlens"], int(batch["max_seqlen"])
            batch = {
                **batch,
                "packed_seq_params": PackedSeqParams(
                    qkv_format="thd",
                    cu_seqlens_q=cu,
                    cu_seqlens_kv=cu,
                    max_seqlen_q=m,
                    max_seqlen_kv=m,
                ),
            }
        return lm_forward_step(batch, model)

    def step_metrics(self, ctx: TrainContext, state: Any, result: Any) -> dict[str, float]:
        return {"loss_tokens": float(result.tokens)}

    def validation_microbatches(self, ctx: TrainContext, state: Any) -> list[dict] | None:
        """The first ``eval_iters`` global batches of the validation set (the same sequences
        every time, so values are comparable across evaluations); the base class reports
        their token-mean loss as ``val_loss``."""
        if self.valid_set is None:
            return None
        n, gbs = len(self.valid_set), self.job.data.global_batch_size
        indices = [
            i % n for b in range(self.job.train.eval_iters) for i in self._rank_share(ctx, b * gbs)
        ]
        return self._batches(self.valid_set, indices)


STAGE = Stage(
    name="sft",
    help="supervised fine-tuning (CoT/TIR) on packed sequences",
    task=SFTTask,
    job_type=SFTJob,
    recipes=RECIPES,
)

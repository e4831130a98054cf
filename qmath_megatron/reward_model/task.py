"""Reward-model training as a task of the shared loop (``qmath train rm``).

- **Model**: :class:`~qmath_megatron.reward_model.model.RewardGPTModel` (GPTModel backbone
  without LM head + the score head on the last pipeline stage) built by the one builder;
  ``model.init_from`` loads the backbone of an SFT (LM) checkpoint and leaves the head
  freshly initialised, or all of a reward-model checkpoint. Checkpoints say ``head:
  "score"`` in ``qmath_model.json`` so ``qmath convert`` / ``qmath rm score`` know them.
- **Data**: groups from ``qmath data rm-prepare`` (or generated, ``tiny_cpu_rm``); a step
  takes ``data.global_batch_size`` groups from a per-epoch shuffled order; each DP rank
  takes a contiguous share and cuts it into microbatches of ``data.micro_batch_size``
  *whole* groups (:func:`group_microbatches`): every response of a prompt is in the same
  microbatch, so the listwise loss sees the whole group.
- **Loss**: :func:`qmath_megatron.reward_model.loss.group_losses` per microbatch; with
  ``calculate_per_token_loss`` and the number of groups as the count, the gradient is that
  of the mean of ``L(x)`` over all prompts of the global batch (all microbatches and DP
  ranks), as the report's loss.
- **Metrics**: ``loss`` (the RM loss), ``pairwise_accuracy``, ``best-of-group_accuracy``,
  ``score_gap`` per step; every ``train.eval_interval`` the same on all held-out groups
  (``val_*``), and once before the first step (``initial_val_*``, logged with step 1).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qmath_megatron.convert.heads import LM_HEAD
from qmath_megatron.reward_model import SCORE_HEAD
from qmath_megatron.reward_model.config import RMJob
from qmath_megatron.reward_model.data import (
    LABELS_SUFFIX,
    RMGroupDataset,
    RMPrepareConfig,
    prepare_rm,
)
from qmath_megatron.reward_model.loss import (
    LOSS_KEY,
    METRIC_KEYS,
    PAD_GROUP,
    group_losses,
    loss_report,
)
from qmath_megatron.reward_model.recipes import RECIPES
from qmath_megatron.reward_model.synthetic import write_synthetic_jsonl
from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer
from qmath_megatron.training.resume import dataset_fingerprint
from qmath_megatron.training.task import Stage, Task, TrainContext


def group_microbatches(
    groups: list,
    groups_per_microbatch: int,
    seq_length: int,
    pad_id: int,
    *,
    fixed_rows: int | None = None,
    fixed_width: bool = False,
    multiple: int = 8,
) -> list[dict[str, torch.Tensor]]:
    """Microbatches of whole groups (:class:`~qmath_megatron.reward_model.data.RMGroup`).

    Each microbatch holds ``groups_per_microbatch`` consecutive groups (the last may hold
    fewer): ``tokens``/``position_ids`` ``[R, W]`` (right-padded with ``pad_id``),
    ``score_index`` ``[R]`` (last real position), ``group_ids`` ``[R]`` (0.. within the
    microbatch; :data:`PAD_GROUP` for padding rows), ``correct`` ``[R]`` bool. ``R`` is the
    microbatch's responses, or ``fixed_rows`` (padded with one-token rows; pipeline
    parallelism needs one shape); ``W`` the longest sequence rounded up to ``multiple``,
    or ``seq_length`` with ``fixed_width``.
    """
    out = []
    for start in range(0, len(groups), groups_per_microbatch):
        members = groups[start : start + groups_per_microbatch]
        seqs = [s for g in members for s in g.sequences]
        gids = [i for i, g in enumerate(members) for _ in g.sequences]
        correct = [bool(c) for g in members for c in g.correct]
        if fixed_rows is not None:
            if len(seqs) > fixed_rows:
                raise ValueError(f"{len(seqs)} responses exceed the fixed {fixed_rows} rows")
            pad = fixed_rows - len(seqs)
            seqs += [np.asarray([pad_id])] * pad
            gids += [PAD_GROUP] * pad
            correct += [False] * pad
        longest = max(len(s) for s in seqs)
        if longest > seq_length:
            raise ValueError(
                f"a response of {longest} tokens exceeds model.seq_length {seq_length}"
            )
        width = seq_length if fixed_width else min(seq_length, -(-longest // multiple) * multiple)
        tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        out.append(
            {
                "tokens": tokens,
                "position_ids": torch.arange(width)
                .unsqueeze(0)
                .expand(len(seqs), width)
                .contiguous(),
                "score_index": torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long),
                "group_ids": torch.tensor(gids, dtype=torch.long),
                "correct": torch.tensor(correct, dtype=torch.bool),
            }
        )
    return out


def rm_loss_func(group_ids: torch.Tensor, correct: torch.Tensor, output: torch.Tensor):
    """Loss function of one microbatch: ``(sum of group losses, groups, report)``."""
    return loss_report(group_losses(output, correct.to(output.device), group_ids.to(output.device)))


def rm_forward_step(batch: dict, model: Any):
    """Scores of the microbatch's responses, then the listwise loss of its groups."""
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        score_index=batch["score_index"],
    )
    return output, partial(rm_loss_func, batch["group_ids"], batch["correct"])


class RewardModelTask(Task):
    name = "rm"
    # An SFT (LM) checkpoint initialises the backbone; a reward-model one all of the model.
    init_heads = (LM_HEAD, SCORE_HEAD)
    calculate_per_token_loss = True  # the count is groups: the mean over prompts
    loss_key = LOSS_KEY
    job: RMJob

    # ---- set-up ------------------------------------------------------------------------
    def prepare(self, ctx: TrainContext) -> RMJob:
        """Generate the synthetic groups of the CPU recipe (rank 0; others wait)."""
        import torch.distributed as dist

        job, d = self.job, self.job.data
        if d.prefix or d.synthetic_groups <= 0:
            if not d.prefix:
                raise ValueError(
                    "set data.prefix (qmath data rm-prepare output) or data.synthetic_groups"
                )
            return job
        if not job.checkpoint.save:
            raise ValueError("synthetic data needs checkpoint.save (its work directory)")
        workdir = Path(job.checkpoint.save) / "data"
        prefixes = {"prefix": str(workdir / "train")}
        if d.synthetic_valid_groups:
            prefixes["valid_prefix"] = str(workdir / "valid")
        if ctx.is_main:
            _build_synthetic(workdir, d, job.model.seq_length, job.train.seed)
        dist.barrier()
        return replace(job, data=replace(d, **prefixes))

    def build_model(self, ctx: TrainContext, config: Any) -> list:
        from qmath_megatron.reward_model.model import build_reward_model  # imports Megatron

        return build_reward_model(
            ctx.flavor,
            config,
            padded_vocab=ctx.padded_vocab,
            max_sequence_length=ctx.flavor.max_position_embeddings,
        )

    def model_meta(self, ctx: TrainContext) -> Any:
        meta = super().model_meta(ctx)
        meta.head = SCORE_HEAD
        return meta

    def load_initial_weights(self, chunks: list, checkpoint: str) -> None:
        from qmath_megatron.reward_model.model import load_initial_weights  # imports Megatron

        load_initial_weights(chunks, checkpoint, self.job.model.flavor)

    def data_fingerprint(self) -> dict[str, Any]:
        # Not the report: it holds the preparation's wall time (the synthetic data is
        # prepared again on every start).
        suffixes = (".idx", ".bin", LABELS_SUFFIX)
        d = self.job.data
        return {
            f"data.{key} {prefix}": dataset_fingerprint(prefix, suffixes)
            for key, prefix in (("prefix", d.prefix), ("valid_prefix", d.valid_prefix))
            if prefix
        }

    def setup(self, ctx: TrainContext) -> None:
        job, d = self.job, self.job.data
        self.train_set = RMGroupDataset(d.prefix)
        self.valid_set = RMGroupDataset(d.valid_prefix) if d.valid_prefix else None
        share = d.global_batch_size // ctx.dp_size
        if d.global_batch_size % ctx.dp_size or share % d.micro_batch_size:
            raise ValueError(
                f"data.global_batch_size {d.global_batch_size} must split into {ctx.dp_size} "
                f"data-parallel shares of whole microbatches of {d.micro_batch_size} groups"
            )
        for ds in filter(None, (self.train_set, self.valid_set)):
            if ds.seq_length > job.model.seq_length:
                raise ValueError(
                    f"{ds.prefix} was prepared with --seq-length {ds.seq_length} > "
                    f"model.seq_length {job.model.seq_length}"
                )
        self.max_group = max(
            ds.max_group_size for ds in filter(None, (self.train_set, self.valid_set))
        )
        self.pp = job.parallel.pp
        tp = job.parallel.tp
        self.multiple = 8 * tp // math.gcd(8, tp)  # sequence parallelism splits W over TP
        self._orders: dict[int, np.ndarray] = {}
        self.initial_eval: dict[str, float] = {}

    def total_iters(self) -> int:
        job = self.job
        if job.train.train_iters is not None:
            return job.train.train_iters
        if job.data.epochs is None:
            raise ValueError("set train.train_iters or data.epochs")
        return max(1, math.ceil(job.data.epochs * len(self.train_set) / job.data.global_batch_size))

    @classmethod
    def planned_iters(cls, job: RMJob) -> int | None:
        return job.train.train_iters

    def step_tokens(self) -> int:
        """Token slots of a step: groups x largest group x seq_length (an upper bound)."""
        return self.job.data.global_batch_size * self.max_group * self.job.model.seq_length

    # ---- data --------------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            rng = np.random.default_rng([self.job.train.seed, epoch])
            self._orders = {epoch: rng.permutation(len(self.train_set))}
        return self._orders[epoch]

    def _microbatches(self, ctx: TrainContext, groups: list) -> list[dict]:
        d = self.job.data
        pipelined = self.pp > 1
        return group_microbatches(
            groups,
            d.micro_batch_size,
            self.job.model.seq_length,
            self.train_set.pad_id,
            fixed_rows=d.micro_batch_size * self.max_group if pipelined else None,
            fixed_width=pipelined,
            multiple=self.multiple,
        )

    def microbatches(self, ctx: TrainContext, state: Any) -> list[dict]:
        d, n = self.job.data, len(self.train_set)
        share = d.global_batch_size // ctx.dp_size
        first = state.consumed_samples + ctx.dp_rank * share
        groups = []
        for i in range(first, first + share):
            groups.append(self.train_set[int(self._order(i // n)[i % n])])
        return self._microbatches(ctx, groups)

    def forward_step(self, batch: dict, model: Any):
        return rm_forward_step(batch, model)

    def before_step(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        """Collective: held-out metrics before the first step of a run (not on resume)."""
        if state.iteration == 0 and self.valid_set is not None:
            self.initial_eval = self.evaluate(ctx, state)
            if ctx.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in self.initial_eval.items())
                print(f"before training: {shown}", flush=True)
        return {}

    # ---- metrics -----------------------------------------------------------------------
    def step_metrics(self, ctx: TrainContext, state: Any, result: Any) -> dict[str, float]:
        if state.iteration == 1 and self.initial_eval:
            return {f"initial_{k}": v for k, v in self.initial_eval.items()}
        return {}

    def evaluate(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        """Collective: the loss and metrics over all held-out groups (``val_*``)."""
        if self.valid_set is None:
            return {}
        n = len(self.valid_set)
        # Every DP rank takes a contiguous share; the counts make the reduction exact.
        per = -(-n // ctx.dp_size)
        lo, hi = min(n, ctx.dp_rank * per), min(n, (ctx.dp_rank + 1) * per)
        groups = [self.valid_set[i] for i in range(lo, hi)]
        if not groups:  # a rank without groups still joins the collectives
            raise ValueError(
                f"{n} held-out groups are fewer than {ctx.dp_size} data-parallel ranks"
            )
        mbs = self._microbatches(ctx, groups)
        means = ctx.forward_only(mbs, self.forward_step, keys=list(METRIC_KEYS))
        return {"val_" + k.replace(" ", "_"): v for k, v in means.items()}


def _build_synthetic(workdir: Path, d: Any, seq_length: int, seed: int) -> None:
    """Tokenizer + generated train/held-out groups through ``rm-prepare`` (rank 0)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tok = Path(d.tokenizer) if d.tokenizer else workdir / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_qwen25_tokenizer(tok)
    for name, count, s in (
        ("train", d.synthetic_groups, seed),
        ("valid", d.synthetic_valid_groups, seed + 1),
    ):
        if not count:
            continue
        src = write_synthetic_jsonl(workdir / f"{name}.jsonl", count, s)
        prepare_rm(
            RMPrepareConfig(
                [str(src)], str(workdir / name), str(tok), seq_length=seq_length, overwrite=True
            )
        )


STAGE = Stage(
    name="rm",
    help="reward model (Qwen2.5-Math-RM): listwise loss over groups of labelled responses",
    task=RewardModelTask,
    job_type=RMJob,
    recipes=RECIPES,
)

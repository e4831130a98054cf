"""The Task protocol: what a training stage supplies to the shared loop.

The loop (:func:`qmath_megatron.training.loop.train`) owns everything every stage needs:
process groups and seeds, the ``TransformerConfig``, DDP, Megatron's (distributed)
optimizer, the LR scheduler, checkpoint save/resume (with the changed-settings check and
the preemption signals), metrics sinks, the non-finite-step policy and the eval cadence.
A task owns what differs: its model head, its data, its forward step and loss, work
before each optimizer step, its metrics and any extra state. Pretraining
(:mod:`qmath_megatron.pretrain.task`), SFT (:mod:`qmath_megatron.sft.task`), the reward
model (:mod:`qmath_megatron.reward_model.task`) and GRPO (:mod:`qmath_megatron.rl.task`)
are tasks.

Order of calls (every rank runs every hook; hooks marked *collective* must be called by
all ranks, the loop does so)::

    task = TaskClass(job)
    job = task.prepare(ctx)                    # e.g. rank 0 builds data; may return a new job
    chunks = task.build_model(ctx, config)     # this rank's model chunks (one per VPP stage)
    task.load_initial_weights(chunks, path)    # model.init_from unless resuming (collective)
    ... loop wraps DDP, builds the optimizer
    task.setup(ctx)                            # datasets, engines, reference model, ...
    total = task.total_iters()                 # the scheduler's length
    ... loop builds the scheduler, restores a checkpoint when resuming (model, optimizer,
        scheduler, RNG, TrainState) and then calls task.load_state_dict(extra)
    per step:
        metrics = task.before_step(ctx, state)       # GRPO: export weights, rollout, old log-probs
        mbs = task.microbatches(ctx, state)          # this DP rank's microbatches of the step
        result = train_step(..., task.forward_step)  # through the shared schedule call
        metrics |= task.step_metrics(ctx, state, result)
        every train.eval_interval: metrics |= task.evaluate(ctx, state)
                                     # default: val_loss over task.validation_microbatches
        on save: extra = task.state_dict()
    task.close()

**Model** (:meth:`Task.build_model`): returns this rank's chunks built from the loop's
``config`` (a Megatron ``TransformerConfig`` with parallel layout, precision, recompute
and ``calculate_per_token_loss`` set). The default is a ``GPTModel`` with the LM head
(:func:`qmath_megatron.models.builder.build_model`). A reward model returns a
``GPTModel`` backbone without the LM head (``post_process`` stays True on the last stage
so the final norm runs; no output layer) plus its score head on the last pipeline stage
only (``ctx.is_last_stage``); its :meth:`model_meta` describes the layout so the
checkpoint is self-describing, and :meth:`load_initial_weights` loads the backbone of an
SFT checkpoint and leaves the head freshly initialised (non-strict load of the head keys).

**Data** (:meth:`Task.microbatches`): returns a list of microbatch dicts for *this DP
rank* for the step that starts at ``state.consumed_samples`` (the loop adds
``data.global_batch_size`` after each step; the checkpoint stores it, so a resumed run
continues with exactly the next batch). Keys are whatever the task's
:meth:`forward_step` reads; the standard ones are ``tokens``, ``labels``, ``loss_mask``,
``position_ids`` ``[micro_batch, seq]`` and optionally ``attention_mask`` ``[b, 1, s, s]``
(True = masked) and ``packed_seq_params``. Tensors shaped ``[b, s, ...]`` are cut for
context parallelism by the schedule call (:func:`qmath_megatron.parallel.schedule.cp_slice`).
Microbatches need not hold the same number of samples: a reward model keeps each prompt's
group of responses in one microbatch (then ``data.global_batch_size`` counts prompts and
the loss function's ``count`` is the number of groups). With PP > 1 every microbatch of a
step must have the same ``[b, s]`` shape (pad). ``ctx.dp_rank`` / ``ctx.dp_size`` say
which share is this rank's.

**Forward step and loss** (:meth:`Task.forward_step`): ``forward_step(batch, model) ->
(output_tensor, loss_func)``, Megatron's contract with the batch already taken from the
iterator. ``loss_func(output_tensor)`` returns ``(loss_sum, count, report)`` (see
:mod:`qmath_megatron.parallel.schedule`). With ``calculate_per_token_loss = True`` the
gradient is that of ``sum(loss_sum) / sum(count)`` over the whole global batch (all
microbatches, DP and CP ranks): SFT's token mean, GRPO's token-level aggregation, the RM's
mean over prompts. With False (pretraining, Megatron-LM's default) each microbatch's loss
is ``loss_sum / count`` and microbatches and DP ranks are averaged. ``loss_key`` names the
report entry logged as ``loss`` and checked for NaN/inf; other report entries are logged
under their names (spaces become underscores).

**Forward-only passes** (GRPO's old-policy and reference log-probs, eval):
``ctx.forward_only(microbatches, forward_step)`` runs the same schedule call without
gradients and returns the reduced report means; ``ctx.forward_collect(microbatches,
forward_step)`` returns, on the last pipeline stage, one value per microbatch of
``loss_func(output, non_loss_data=True)`` (e.g. per-token log-probs to attach to the
training microbatches), ``[]`` on other stages. A frozen reference model is built by the
task in :meth:`setup` with ``ctx.build_frozen_model`` and passed as ``chunks=``.

**Pre-step work** (:meth:`Task.before_step`): runs on every rank before
:meth:`microbatches`; returns metrics (floats, the same on every rank or at least on rank
0, which logs). GRPO exports weights here (``qmath_megatron.convert.export.iter_hf_buckets``
over ``ctx.unwrapped``, a collective), generates rollouts, computes log-probs.

**Metrics**: :meth:`step_metrics` and :meth:`evaluate` return dicts merged into the
step's metrics (console, JSONL at ``<checkpoint.save>/metrics.jsonl``, TensorBoard, W&B).

**Extra state**: :meth:`state_dict` returns picklable plain data saved with every
checkpoint (written once, by rank 0: it must be the same on every rank) and passed to
:meth:`load_state_dict` on resume, after :meth:`setup` and before the first step.

**A new stage** (``qmath train <stage>``): a module defining ``STAGE = Stage(name, help,
task, job_type, recipes)`` and one line in ``STAGES`` of
:mod:`qmath_megatron.training.cli`. The CLI then gives it ``--recipe``, ``--config``,
``--dry-run``, ``--world-size``, ``--json`` and ``key.sub=value`` overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from qmath_megatron.checkpoint.model_checkpoint import (
    CheckpointError,
    ModelMeta,
    load_model,
    resolve_checkpoint,
)
from qmath_megatron.config.job import JobConfig
from qmath_megatron.config.recipes import build_recipe
from qmath_megatron.models.builder import build_model, build_transformer_config, layer_spec
from qmath_megatron.models.flavors import QwenFlavor, get_flavor
from qmath_megatron.parallel.schedule import (
    ForwardStep,
    reduce_reports,
    report_means,
    run_schedule,
)
from qmath_megatron.training.step import lm_forward_step


@dataclass
class TrainContext:
    """What the loop hands to a task's hooks. Fields are filled as the loop proceeds:
    ``model``/``unwrapped`` after the model is built."""

    job: JobConfig
    rank: int
    world_size: int
    is_main: bool  # global rank 0: logs, writes files
    device: Any  # torch.device
    dp_rank: int
    dp_size: int
    tp_rank: int
    is_first_stage: bool  # pipeline
    is_last_stage: bool  # pipeline
    flavor: Any = None  # QwenFlavor (with the job's long-context overrides)
    padded_vocab: int = 0
    model: list = field(default_factory=list)  # DDP-wrapped chunks (what the schedule runs)
    unwrapped: list = field(default_factory=list)  # the plain chunks (export, checkpoints)

    def forward_only(
        self,
        microbatches: Sequence[dict],
        forward_step: ForwardStep,
        *,
        chunks: list | None = None,
        keys: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Collective: forward without gradients through the shared schedule call; the
        global means of the loss function's report entries (same on every rank)."""
        reports = run_schedule(chunks or self.model, forward_step, microbatches, forward_only=True)
        return report_means(reduce_reports(reports, keys))

    def forward_collect(
        self, microbatches: Sequence[dict], forward_step: ForwardStep, *, chunks: list | None = None
    ) -> list:
        """Collective: forward without gradients; on the last pipeline stage one value per
        microbatch of ``loss_func(output, non_loss_data=True)``, ``[]`` elsewhere."""
        return run_schedule(
            chunks or self.model,
            forward_step,
            microbatches,
            forward_only=True,
            collect_non_loss_data=True,
        )

    def build_frozen_model(self, checkpoint: str) -> list:
        """Collective: a second, frozen (eval, no grad) copy of a Megatron checkpoint at this
        job's layout, e.g. GRPO's reference model. Same flavor/vocab as the job's model."""
        iter_dir, meta = resolve_checkpoint(checkpoint)
        job = self.job
        config = build_transformer_config(self.flavor, job.parallel, job.precision)
        chunks = build_model(self.flavor, config, padded_vocab=meta.padded_vocab_size)
        load_model(chunks, iter_dir, meta, current_spec=layer_spec())
        for c in chunks:
            c.eval()
            c.requires_grad_(False)
        return chunks


# What must agree between ``model.init_from`` and the job's flavor for the weights to load.
_SIZE_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "tie_word_embeddings",
)


def _describe_size(flavor: QwenFlavor) -> str:
    tied = "tied" if flavor.tie_word_embeddings else "untied"
    return (
        f"{flavor.num_layers} layers, hidden {flavor.hidden_size}, ffn {flavor.ffn_hidden_size},"
        f" {flavor.num_attention_heads} heads, {flavor.num_query_groups} KV groups, {tied}"
        " embeddings"
    )


class Task:
    """Base class of a training stage's task; defaults implement a GPT language model
    (LM head, masked next-token loss). Subclasses override what differs; see the module
    docstring for when each hook runs."""

    name: ClassVar[str] = "task"
    # True: gradient of the global-batch mean (sum of loss sums / sum of counts over all
    # microbatches, DP and CP ranks). False: Megatron-LM's mean of per-microbatch means.
    calculate_per_token_loss: ClassVar[bool] = False
    loss_key: ClassVar[str] = "lm loss"
    # The ``ModelMeta.head`` values a ``model.init_from`` checkpoint may have: the LM stages
    # continue a language model; loading another head's weights would train without a word.
    init_heads: ClassVar[tuple[str, ...]] = ("lm",)

    def __init__(self, job: JobConfig):
        self.job = job

    # ---- set-up ------------------------------------------------------------------------
    def prepare(self, ctx: TrainContext) -> JobConfig:
        """Before the model exists (every rank): e.g. build generated data on rank 0 and wait
        at a barrier. Return the job to use (possibly with filled-in paths)."""
        return self.job

    def build_model(self, ctx: TrainContext, config: Any) -> list:
        """This rank's model chunks for the loop's ``TransformerConfig``."""
        return build_model(
            ctx.flavor,
            config,
            padded_vocab=ctx.padded_vocab,
            max_sequence_length=ctx.flavor.max_position_embeddings,
        )

    def model_meta(self, ctx: TrainContext) -> Any:
        """The ``ModelMeta`` written next to every checkpoint (what ``qmath convert`` reads)."""
        p = self.job.parallel
        return ModelMeta(
            flavor=ctx.flavor,
            padded_vocab_size=ctx.padded_vocab,
            dtype=self.job.precision.dtype,
            layer_spec=layer_spec(),
            tp=p.tp,
            pp=p.pp,
            vpp=p.vpp,
        )

    def resolve_init(self, checkpoint: str) -> tuple[Path, ModelMeta]:
        """``model.init_from``'s iteration directory and metadata; refuses a checkpoint whose
        head this stage cannot start from (:attr:`init_heads`)."""
        iter_dir, meta = resolve_checkpoint(checkpoint)
        if meta.head not in self.init_heads:
            raise CheckpointError(
                f"model.init_from {checkpoint} has a {meta.head!r} head; the {self.name} stage "
                f"starts from a checkpoint with a {' or '.join(map(repr, self.init_heads))} head"
            )
        mine = get_flavor(self.job.model.flavor)
        if any(getattr(mine, f) != getattr(meta.flavor, f) for f in _SIZE_FIELDS):
            # Caught here, before the model is built, rather than as a shape error from
            # inside every rank's distributed load.
            raise CheckpointError(
                f"model.init_from {checkpoint} holds {meta.flavor.name} "
                f"({_describe_size(meta.flavor)}), not model.flavor {mine.name} "
                f"({_describe_size(mine)})"
            )
        return iter_dir, meta

    def load_initial_weights(self, chunks: list, checkpoint: str) -> None:
        """Collective: load ``model.init_from`` (not called when resuming)."""
        iter_dir, meta = self.resolve_init(checkpoint)
        load_model(chunks, iter_dir, meta, current_spec=layer_spec())

    def init_padded_vocab(self) -> int | None:
        """The padded vocab of ``model.init_from`` (so its embedding loads), else None; runs
        before the model is built, so a checkpoint of the wrong head fails here."""
        if not self.job.model.init_from:
            return None
        return self.resolve_init(self.job.model.init_from)[1].padded_vocab_size

    def setup(self, ctx: TrainContext) -> None:
        """After the model, optimizer and any resumed state exist: datasets, engines, ..."""

    def total_iters(self) -> int:
        """Optimizer steps of the whole run (the LR schedule's length)."""
        return self.job.total_iters()

    @classmethod
    def planned_iters(cls, job: JobConfig) -> int | None:
        """Steps for ``--dry-run`` (no process group, no data opened); None if unknown."""
        return job.total_iters()

    # ---- per step ----------------------------------------------------------------------
    def before_step(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        """Work before the step's microbatches are drawn; returns metrics."""
        return {}

    def microbatches(self, ctx: TrainContext, state: Any) -> list[dict]:
        """This DP rank's microbatches for the step starting at ``state.consumed_samples``."""
        raise NotImplementedError(f"{type(self).__name__} must implement microbatches()")

    def forward_step(self, batch: dict, model: Any):
        """``(output_tensor, loss_func)`` for one microbatch (default: masked LM loss)."""
        return lm_forward_step(batch, model)

    def step_metrics(self, ctx: TrainContext, state: Any, result: Any) -> dict[str, float]:
        """Extra metrics after the optimizer step (``result``: :class:`StepResult`)."""
        return {}

    def step_tokens(self) -> int:
        """Token slots processed per step (throughput and MFU): global batch x seq."""
        return self.job.data.global_batch_size * self.job.model.seq_length

    def validation_microbatches(self, ctx: TrainContext, state: Any) -> list[dict] | None:
        """This DP rank's validation microbatches for the evaluation at ``state``, or None
        when the task has no validation set (the default :meth:`evaluate` then reports
        nothing). The same on every call if values are to be comparable across evals."""
        return None

    def evaluate(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        """Collective, every ``train.eval_interval`` steps: validation metrics. Default:
        ``val_loss``, the ``loss_key`` entry over :meth:`validation_microbatches` (forward
        only, reduced as the training loss is: token-weighted with
        ``calculate_per_token_loss``, else a mean of microbatch means; over DP and CP)."""
        mbs = self.validation_microbatches(ctx, state)
        if mbs is None:
            return {}
        means = ctx.forward_only(mbs, self.forward_step, keys=[self.loss_key])
        return {"val_loss": means[self.loss_key]}

    # ---- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Extra state saved with each checkpoint (plain data, the same on every rank)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume (after :meth:`setup`, before the first step)."""

    def data_fingerprint(self) -> dict[str, Any]:
        """``{dataset name: {file: fingerprint}}`` of the data the job reads (called after
        :meth:`prepare`; build entries with :func:`~qmath_megatron.training.resume.
        dataset_fingerprint`). Saved with each checkpoint; a resume refuses changed files."""
        return {}

    def close(self) -> None:
        """End of training (also after an error): release engines, files, ..."""


@dataclass(frozen=True)
class Stage:
    """A ``qmath train <name>`` subcommand: its task, job type and recipes."""

    name: str
    help: str
    task: type[Task]
    job_type: type[JobConfig]
    recipes: dict[str, Callable[[], JobConfig]]

    def recipe(self, name: str) -> JobConfig:
        return build_recipe(self.recipes, name, f"{self.name} recipe")

"""GRPO as a task of the shared loop (``qmath train grpo``).

Before the model and any engine (``prepare``), :mod:`qmath_megatron.rl.prepare` checks the
job: the prompts file, the paths it names, the engines' model and head_dim; a job that
cannot run stops there, in one line. The rollout engines (``rl.engines`` vLLM processes,
colocated or remote, and the weight-transfer backend) are placed and started by
:mod:`qmath_megatron.rl.engines` in ``setup`` (or, with ``rl.engine_handles``, found
through the handle files of ``qmath engine serve``).

Per step (``before_step``, every rank):

1. **sync**: colocated GPU engines wake up (weights); the policy's weights go to every
   engine (the weight transport of :mod:`qmath_megatron.rl.weight_sync`: streaming HF
   export, one sender per engine, version + 1); a barrier, then every engine must report
   that version;
2. **rollout** (global rank 0): ``data.global_batch_size`` prompts x ``rl.group_size``
   samples with the engines' processed log-probs, the prompts split over the engines
   (contiguous chunks, concurrently); every sample must carry the version just synced
   (stale samples are refused); colocated GPU engines go back to sleep (level 1);
3. **reward and advantages** (rank 0): the verifier registered for ``rl.task``
   (:mod:`qmath_megatron.rl.reward`: the toy task's rule or the shared answer checker;
   + the reward model when configured, shaped as in the Qwen2.5-Math report), group
   advantages; the rollouts are broadcast to all ranks and each DP rank takes its share
   (prompts, sampling and scoring: :class:`~qmath_megatron.rl.rollout.Rollouts`);
4. **old-policy log-probs**: a forward-only pass through the same schedule call (and the
   reference model's when ``rl.kl_coef > 0``), attached to the microbatches on the last
   pipeline stage;

then the loop's ``train_step`` runs :meth:`GRPOTask.forward_step` (PPO-clip loss of
``rl/loss.py`` on the log-probs of ``models/logprobs.py``, token-level over the global
batch: ``calculate_per_token_loss``).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch

from qmath_megatron.rl.config import GRPOJob
from qmath_megatron.rl.engines import (
    dry_run_engines,
    format_dry_run_engines,
    plan_engines,
    start_engines,
)
from qmath_megatron.rl.loss import LOSS_KEY, grpo_forward_step
from qmath_megatron.rl.prepare import validate_job, with_synthetic_prompts, write_synthetic_prompts
from qmath_megatron.rl.recipes import RECIPES
from qmath_megatron.rl.reward import get_reward
from qmath_megatron.rl.rollout import Rollouts
from qmath_megatron.rl.weight_sync import StaleSampleError, build_transport, check_versions
from qmath_megatron.training.checkpointing import latest_iteration
from qmath_megatron.training.resume import dataset_fingerprint
from qmath_megatron.training.task import Stage, Task, TrainContext


class GRPOTask(Task):
    name = "grpo"
    calculate_per_token_loss = True  # token-level aggregation over the global batch
    loss_key = LOSS_KEY
    job: GRPOJob
    problems: list[dict] | None = None  # rank 0: the prompts file's rows, checked in prepare

    # ---- set-up ------------------------------------------------------------------------
    def prepare(self, ctx: TrainContext) -> GRPOJob:
        """Before the model and any engine (every rank, a collective): rank 0 writes the
        synthetic problems if the job asks for them and runs every check of
        :mod:`qmath_megatron.rl.prepare`; an error there raises, in one line, on every
        rank. The checked problems stay on rank 0 for the rollouts."""
        import torch.distributed as dist

        job = with_synthetic_prompts(self.job)
        box: list[Any] = [None]
        if ctx.is_main:
            try:
                if job.data.prompts != self.job.data.prompts:
                    write_synthetic_prompts(job.data.prompts, job.data.synthetic_problems)
                resume_root = job.checkpoint.load or job.checkpoint.save
                self.problems = validate_job(
                    job,
                    on_gpu=torch.cuda.is_available(),
                    resuming=bool(resume_root) and latest_iteration(resume_root) is not None,
                )
            except Exception as e:  # the other ranks must not wait for rank 0 forever
                box[0] = (type(e), str(e))
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            kind, message = box[0]
            if kind in (ValueError, FileNotFoundError):  # the same one-line error everywhere
                raise kind(message)
            raise RuntimeError(f"rank 0 could not prepare the run: {kind.__name__}: {message}")
        return job

    def data_fingerprint(self) -> dict[str, Any]:
        prompts = self.job.data.prompts
        return {f"data.prompts {prompts}": dataset_fingerprint(prompts, ("",))} if prompts else {}

    def setup(self, ctx: TrainContext) -> None:
        rl = self.job.rl
        self.reward = get_reward(rl.task)
        self.reward.check(rl.mode, reward_model=bool(rl.rm_model))
        self.flavor, self.engine, self.samples = ctx.flavor, None, None
        plan = plan_engines(rl, ctx.is_main)
        self.layout = plan.layout
        self.engine, handles = start_engines(plan, self.job, ctx.flavor, ctx.is_main)
        # The transport the layout names; it also wakes and puts to sleep the engines that
        # sleep while the trainer steps (rank 0 holds them).
        self.sync = build_transport(
            self.layout.backend,
            ctx.unwrapped,
            ctx.flavor,
            ctx.padded_vocab,
            handles,
            bucket_mb=rl.bucket_mb,
            engines_sleep=self.layout.sleep,
            sleeper=self.engine,
        )
        # Resumed: versions keep counting from the checkpoint's (one sync per step).
        self.sync.version = getattr(self, "_resumed_version", 0)
        reference = rl.reference or self.job.model.init_from
        if rl.kl_coef and not reference:
            raise ValueError(
                "rl.kl_coef > 0 needs rl.reference or model.init_from (the SFT checkpoint)"
            )
        self.reference = ctx.build_frozen_model(reference) if rl.kl_coef else None
        self.rollouts = Rollouts(
            self.job, self.reward, ctx.flavor.vocab_size, ctx.is_main, problems=self.problems
        )

    def total_iters(self) -> int:
        return self.job.total_iters()

    @classmethod
    def dry_run_extra(cls, job: GRPOJob, plan: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """``--dry-run``: the rollout engines' layout (placement, engines, engine TP, GPUs,
        backend) for a GPU run of the planned trainer world."""
        info = dry_run_engines(job, plan["world_size"])
        return {"engines": info}, format_dry_run_engines(info)

    def step_tokens(self) -> int:
        return self.job.data.global_batch_size * self.job.rl.group_size * self.job.model.seq_length

    # ---- per step ----------------------------------------------------------------------
    def _rollout(self, step: int) -> tuple[dict, dict[str, float]]:
        """Rank 0: sample, score, advantages. Returns the training tensors and metrics."""
        prompts, problems = self.rollouts.prompts(step, self.engine)
        params = self.rollouts.params(step, self.engine)
        # Every engine must hold the weights just synced (one sender per engine).
        versions = self.engine.weight_versions()
        if any(v != self.sync.version for v in versions):
            raise StaleSampleError(
                f"rollout engines hold weight versions {versions} after the "
                f"sync of version {self.sync.version}"
            )
        self.sync.prepare_for_generation()  # sleeping engines: the KV cache back
        self.engine.reset_usage()
        start = time.perf_counter()
        try:
            groups = self.rollouts.generate(self.engine, prompts, params)
        finally:
            rollout_s = time.perf_counter() - start
            self.sync.finish_generation()  # sleeping engines: memory back to the trainer
        check_versions([c.weight_version for g in groups for c in g], self.sync.version)
        # The loop logs this step as iteration step + 1.
        samples, metrics = self.rollouts.score(prompts, problems, groups, iteration=step + 1)
        metrics |= {
            "rollout_s": rollout_s,
            "sleep_wake_s": self.sync.sleep_wake_s,
            "engines": float(len(self.engine.used)),
            "engine_weight_version_min": float(min(versions)),
            "engine_weight_version_max": float(max(versions)),
        }
        return samples, metrics

    def before_step(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        import torch.distributed as dist

        stats = self.sync.sync()
        dist.barrier()  # every sender has finished its engines' update before any rollout
        box: list[Any] = [None]
        if ctx.is_main:
            box[0] = self._rollout(state.iteration)
        dist.broadcast_object_list(box, src=0)
        samples, metrics = box[0]
        self.samples = self._share(ctx, samples)
        mbs = self._microbatches(ctx)
        start = time.perf_counter()
        fwd = partial(grpo_forward_step, self.flavor.vocab_size, self.job.rl)
        old = ctx.forward_collect(mbs, fwd)
        ref = ctx.forward_collect(mbs, fwd, chunks=self.reference) if self.reference else []
        mismatch_sum = mismatch_max = 0.0
        tokens = 0.0
        for i, mb in enumerate(mbs):
            if old:
                mb["old_logprobs"] = old[i]
                m = mb["loss_mask"] > 0
                diff = torch.exp((old[i] - mb["behaviour_logprobs"]).abs())[m]
                mismatch_sum += float(diff.double().sum())
                mismatch_max = (
                    max(mismatch_max, float(diff.max())) if diff.numel() else mismatch_max
                )
                tokens += float(m.sum())
            if ref:
                mb["ref_logprobs"] = ref[i]
        self._mbs = mbs
        mism = torch.tensor([mismatch_sum, tokens, mismatch_max], dtype=torch.float64)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mism.tolist())
        total = sum(g[0] for g in gathered), sum(g[1] for g in gathered)
        metrics.update(
            sync_s=stats.sync_s,
            sync_bytes=float(stats.bytes),
            weight_version=float(stats.version),
            logprob_mismatch=total[0] / max(total[1], 1.0),
            logprob_mismatch_max=max(g[2] for g in gathered),
            old_logprobs_s=time.perf_counter() - start,
        )
        self._step_start = time.perf_counter()
        return metrics

    def _share(self, ctx: TrainContext, samples: dict) -> dict:
        n = samples["tokens"].shape[0]
        if n % ctx.dp_size:
            raise ValueError(f"{n} responses per step do not split over {ctx.dp_size} DP ranks")
        per = n // ctx.dp_size
        return {k: v[ctx.dp_rank * per : (ctx.dp_rank + 1) * per] for k, v in samples.items()}

    def _microbatches(self, ctx: TrainContext) -> list[dict]:
        s, mb = self.samples, self.job.data.micro_batch_size
        n, seq = s["tokens"].shape
        position_ids = torch.arange(seq).unsqueeze(0)
        out = []
        for i in range(0, n, mb):
            part = {
                k: s[k][i : i + mb] for k in ("tokens", "labels", "loss_mask", "behaviour_logprobs")
            }
            part["advantages"] = s["advantages"][i : i + mb]
            part["position_ids"] = position_ids.expand(part["tokens"].shape[0], seq)
            out.append(part)
        return out

    def microbatches(self, ctx: TrainContext, state: Any) -> list[dict]:
        return self._mbs

    def forward_step(self, batch: dict, model: Any):
        return grpo_forward_step(self.flavor.vocab_size, self.job.rl, batch, model)

    def step_metrics(self, ctx: TrainContext, state: Any, result: Any) -> dict[str, float]:
        train_s = time.perf_counter() - self._step_start
        tokens = float(self.samples["loss_mask"].sum()) * ctx.dp_size
        return {
            "train_s": train_s,
            "tokens_per_s_per_gpu": tokens / max(train_s, 1e-9) / ctx.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"weight_version": self.sync.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The loop calls this after setup, so the sender exists: the next sync (which pushes
        # the resumed weights to the fresh engines) carries the checkpoint's version + 1.
        self._resumed_version = int(state.get("weight_version", 0))
        if getattr(self, "sync", None) is not None:
            self.sync.version = self._resumed_version

    def close(self) -> None:
        try:
            if getattr(self, "sync", None) is not None:
                self.sync.close()  # the transport's set-up, while the engines still run
        finally:
            if getattr(self, "engine", None) is not None:
                self.engine.close()
                self.engine = None
        if getattr(self, "rollouts", None) is not None:
            self.rollouts.close()  # the answer checker, sandbox and reward model


STAGE = Stage(
    name="grpo",
    help="GRPO with vLLM rollout engines that receive the trainer's weights every step",
    task=GRPOTask,
    job_type=GRPOJob,
    recipes=RECIPES,
)

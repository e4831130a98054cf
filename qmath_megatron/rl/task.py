"""GRPO as a task of the shared loop (``qmath train grpo``).

The rollout engines (``rl.engines`` vLLM processes, colocated or remote, and the weight-
transfer backend) are placed and started by :mod:`qmath_megatron.rl.engines` in ``setup``
(or, with ``rl.engine_handles``, found through the handle files of ``qmath engine serve``).

Per step (``before_step``, every rank):

1. **sync**: colocated GPU engines wake up (weights); the policy's weights go to every
   engine (:class:`~qmath_megatron.rl.weight_sync.WeightSync`: streaming HF export, one
   sender per engine, version + 1); a barrier, then every engine must report that version;
2. **rollout** (global rank 0): ``data.global_batch_size`` prompts x ``rl.group_size``
   samples with the engines' processed log-probs, the prompts split over the engines
   (contiguous chunks, concurrently); every sample must carry the version just synced
   (stale samples are refused); colocated GPU engines go back to sleep (level 1);
3. **reward and advantages** (rank 0): the toy task's rule or the shared answer checker
   (+ the reward model when configured, shaped as in the Qwen2.5-Math report), group
   advantages; the rollouts are broadcast to all ranks and each DP rank takes its share;
4. **old-policy log-probs**: a forward-only pass through the same schedule call (and the
   reference model's when ``rl.kl_coef > 0``), attached to the microbatches on the last
   pipeline stage;

then the loop's ``train_step`` runs :meth:`GRPOTask.forward_step` (PPO-clip loss of
``rl/loss.py``, token-level over the global batch: ``calculate_per_token_loss``).

Log-probs are normalised over the real vocabulary: the Megatron embedding has TP padding
rows that the HF model (and so the engine) does not have, so their logits are masked out.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.rl.recipes import RECIPES, GRPOJob
from qmath_megatron.training.task import Stage, Task, TrainContext

LOSS_KEY = "grpo loss"
_NEG = -1e30  # "minus infinity" for padded vocabulary columns (exp -> 0, no inf * 0)


# ----------------------------------------------------------------------------- model code


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(labels), entropy)``, both ``[b, s]``, from vocab-parallel logits
    ``[b, s, V_padded / tp]`` (this TP rank's slice); padded columns are excluded. The
    log-probs carry gradients (Megatron's vocab-parallel cross entropy); the entropy does not.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    part = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * part
    cols = torch.arange(start, start + part, device=logits.device)
    logits = logits.float().masked_fill(cols >= vocab_size, _NEG)
    with torch.no_grad():  # before the cross entropy, which works in place on its input
        group = ps.get_tensor_model_parallel_group()
        gmax = logits.max(-1).values
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax[..., None]
        e = shifted.exp()
        sums = torch.stack([e.sum(-1), (e * shifted).sum(-1)])
        dist.all_reduce(sums, group=group)
        entropy = sums[0].log() - sums[1] / sums[0]
    logp = -vocab_parallel_cross_entropy(logits, labels)
    return logp, entropy


def grpo_loss_func(batch: dict, rl: Any, output: torch.Tensor, non_loss_data: bool = False):
    """Loss function of one microbatch (``output``: ``[b, s, 2]`` log-probs and entropy)."""
    from qmath_megatron.rl.loss import ppo_clip_loss

    logp, entropy = output[..., 0], output[..., 1]
    if non_loss_data:
        return logp.detach()
    mask = batch["loss_mask"].to(logp.device)
    old = batch.get("old_logprobs", logp.detach())
    out = ppo_clip_loss(
        logp,
        old.to(logp.device),
        batch["advantages"].to(logp.device),
        mask,
        clip_low=rl.clip_low,
        clip_high=rl.clip_high,
        behaviour_logprobs=batch["behaviour_logprobs"].to(logp.device),
        tis_cap=rl.tis_cap,
        ref_logprobs=batch.get("ref_logprobs"),
        kl_coef=rl.kl_coef,
    )
    tokens = out.tokens.float()

    def entry(value: torch.Tensor) -> torch.Tensor:
        return torch.stack([value.detach().float().to(tokens.device), tokens])

    report = {
        LOSS_KEY: entry(out.loss_sum),
        "clip_fraction": entry(out.clipped),
        "kl": entry(out.kl_sum),
        "tis_weight": entry(out.tis_sum),
        "tis_capped": entry(out.tis_capped),
        "entropy": entry((entropy.detach() * mask).sum()),
    }
    return out.loss_sum, out.tokens.to(torch.int), report


def grpo_forward_step(vocab_size: int, rl: Any, batch: dict, model: Any):
    from qmath_megatron.convert.export import unwrap

    output = model(batch["tokens"], batch["position_ids"], None)
    if unwrap(model).post_process:
        logp, entropy = vocab_parallel_logprobs(output, batch["labels"], vocab_size)
        output = torch.stack([logp, entropy.to(logp.dtype)], dim=-1)
    return output, partial(grpo_loss_func, batch, rl)


# ----------------------------------------------------------------------------- rollouts


def build_samples(
    prompts: list[list[int]], groups: list[list[Any]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Rollouts -> training tensors, one row per response (prompt-major, G per prompt):
    ``tokens``/``labels``/``loss_mask``/``behaviour_logprobs`` ``[N, seq_length]`` (labels
    are the next tokens; the mask and behaviour log-probs sit at the positions whose label
    is a generated token), ``response_length`` ``[N]``. Responses that do not fit are cut
    (their tail is not trained on)."""
    rows = [(p, c) for p, group in zip(prompts, groups, strict=True) for c in group]
    n = len(rows)
    tokens = torch.full((n, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_length), pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_length)
    behaviour = torch.zeros(n, seq_length)
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (prompt, c) in enumerate(rows):
        seq = list(prompt) + list(c.token_ids)
        if len(prompt) >= seq_length:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens leaves no room in seq_length {seq_length}"
            )
        seq = seq[: seq_length + 1]
        tokens[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        labels[i, : len(seq) - 1] = torch.tensor(seq[1:])
        kept = len(seq) - len(prompt)
        first = len(prompt) - 1
        tool = getattr(c, "tool_mask", None)  # TIR: 0 on tool-output tokens
        m = torch.ones(kept) if tool is None else torch.tensor(tool[:kept], dtype=torch.float)
        mask[i, first : first + kept] = m
        behaviour[i, first : first + kept] = torch.tensor(c.logprobs[:kept])
        lengths[i] = len(c.token_ids)
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": mask,
        "behaviour_logprobs": behaviour,
        "response_length": lengths,
    }


def toy_rewards(groups: list[list[Any]], vocab_size: int) -> torch.Tensor:
    """The toy verifiable task: 1 when the first sampled token is in the lower half of the
    vocabulary, else 0 (a random model starts near 50%)."""
    return torch.tensor([[float(c.token_ids[0] < vocab_size // 2) for c in g] for g in groups])


def math_rewards(
    verdict: torch.Tensor,
    problems: list[dict] | None,
    groups: list[list[Any]],
    scorer: Any = None,
    alpha: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards ``[P, G]`` (float32) of the rollouts and their logged parts.

    ``verdict``: ``[P, G]`` 0/1 verifier verdicts; ``groups[p][g].text``: the responses;
    ``scorer``: a ``RewardScorer`` (``qmath rm score`` machinery, one batched call for all
    P*G responses) or ``None`` (r = r_v). With a scorer, r = sigmoid(alpha * r_m) + (r_v - 1)
    (:func:`qmath_megatron.rl.reward.shaped_reward`).
    """
    from qmath_megatron.rl.reward import shaped_reward

    metrics = {"reward_verifier": float(verdict.mean())}
    rm = None
    if scorer is not None:
        if problems is None:
            raise ValueError("the reward model needs the problems' text")
        texts = [[c.text for c in g] for g in groups]
        rm = torch.tensor(
            scorer.score([p["problem"] for p in problems], texts), dtype=torch.float64
        )
        if rm.shape != verdict.shape:
            raise ValueError(
                f"reward model returned {tuple(rm.shape)} scores for {tuple(verdict.shape)}"
            )
        metrics["reward_model"] = float(rm.mean())
    rewards = shaped_reward(verdict, rm, alpha).float()
    metrics["reward"] = float(rewards.mean())
    return rewards, metrics


class GRPOTask(Task):
    name = "grpo"
    calculate_per_token_loss = True  # token-level aggregation over the global batch
    loss_key = LOSS_KEY
    job: GRPOJob

    # ---- set-up ------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        import torch.distributed as dist

        from qmath_megatron.rl.weight_sync import WeightSync

        rl = self.job.rl
        # Refuse what is configurable but not wired yet, rather than silently ignore it.
        if rl.mode == "tir" and rl.task != "math":
            raise ValueError("rl.mode=tir needs rl.task=math (the model writes code)")
        if rl.rm_model and rl.task != "math":
            raise ValueError("rl.rm_model needs rl.task=math (the RM scores problem/response text)")
        self.flavor, self.engine, self.samples = ctx.flavor, None, None
        self.layout = self._plan_engines(ctx)
        box: list[Any] = [None]
        if ctx.is_main:
            try:
                self.engine = self._start_engines(ctx, self.layout)
                box[0] = self.engine.handles
            except Exception as e:  # the other ranks must not wait for handles forever
                box[0] = f"{type(e).__name__}: {e}"
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise RuntimeError(f"rank 0 could not start the rollout engines: {box[0]}")
        self.sync = WeightSync(
            ctx.unwrapped,
            ctx.flavor,
            ctx.padded_vocab,
            box[0],
            backend=self.layout.backend,
            bucket_bytes=rl.bucket_mb << 20,
        )
        # Resumed: versions keep counting from the checkpoint's (one sync per step).
        self.sync.version = getattr(self, "_resumed_version", 0)
        reference = rl.reference or self.job.model.init_from
        if rl.kl_coef and not reference:
            raise ValueError(
                "rl.kl_coef > 0 needs rl.reference or model.init_from (the SFT checkpoint)"
            )
        self.reference = ctx.build_frozen_model(reference) if rl.kl_coef else None
        self.problems = self._load_problems() if rl.task == "math" else None
        self.checker = self.executor = None
        self.scorer = None
        if rl.rm_model and ctx.is_main:  # rewards are computed on rank 0; fail early
            from qmath_megatron.reward_model.scoring import load_scorer

            self.scorer = load_scorer(
                rl.rm_model, rl.rm_tokenizer, batch_size=rl.rm_batch_size, mode=rl.mode
            )

    def _plan_engines(self, ctx: TrainContext) -> Any:
        """Every rank: the engine layout rank 0 planned (rl/engines.py), checked against
        where the ranks run (senders on other nodes need nccl; with ipc each engine sits on
        its replica's GPUs). Errors raise on every rank."""
        import socket

        import torch.distributed as dist

        from qmath_megatron.parallel.runtime import parallel_ranks
        from qmath_megatron.rl import engines as eng

        rl = self.job.rl
        trainer, my_gpu = eng.local_gpu_view()
        box: list[Any] = [None]
        if ctx.is_main:
            try:
                layout = eng.plan_layout(rl, torch.cuda.is_available(), trainer)
                self._handles = None
                if layout.handles_dir is not None:  # started by `qmath engine serve`
                    layout, self._handles = eng.find_external(layout, rl, torch.cuda.is_available())
                box[0] = (layout, [h.node for h in self._handles or []])
            except ValueError as e:
                box[0] = str(e)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise ValueError(box[0])
        layout, engine_nodes = box[0]
        # Where every rank runs: engines are reached from their senders' nodes only by nccl.
        r = parallel_ranks()
        me = (r["dp_rank"], r["tp_rank"] == 0 and r["pp_rank"] == 0, socket.gethostname(), my_gpu)
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        host0, dp = everyone[0][2], r["dp_size"]
        if layout.handles_dir is not None:  # external engines: each sender reaches its engine
            eng.check_external_senders(
                layout.backend,
                engine_nodes,
                [
                    {host for d, sender, host, _ in everyone if sender and d == i % dp}
                    for i in range(layout.engines)
                ],
            )
            self._listen = None
        else:
            self._listen = eng.listen_address(
                layout.backend,
                [
                    all(host == host0 for d, sender, host, _ in everyone if sender and d == i % dp)
                    for i in range(layout.engines)
                ],
            )
        if layout.backend == "ipc":
            eng.check_ipc_engines(
                layout.gpus,
                [
                    {gpu for d, _, host, gpu in everyone if d == i % dp and host == host0}
                    for i in range(layout.engines)
                ],
            )
        if ctx.is_main:
            eng.note(layout.describe())
            if layout.placement == "colocated" and layout.gpus is None:
                eng.note(
                    "colocated placement on CPU: vLLM has no sleep mode here, so the "
                    "engines run beside the trainer without sleep/wake"
                )
        return layout

    def _start_engines(self, ctx: TrainContext, layout: Any) -> Any:
        """Rank 0: start ``rl.engines`` engine processes (rl/engines.py), or connect to the
        external ones (``rl.engine_handles``)."""
        from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
        from qmath_megatron.rl.engines import RolloutEngines

        job, rl = self.job, self.job.rl
        if layout.handles_dir is not None:  # external engines: connect; close() leaves them up
            return RolloutEngines.connect(layout, self._handles)
        model_dir = rl.engine_model
        kwargs: dict[str, Any] = {"seed": job.train.seed}
        if model_dir is None:
            if rl.task != "toy_half_vocab":
                raise ValueError("set rl.engine_model (the SFT model's HF directory)")
            # The toy task needs no tokenizer; the engines start from any weights of the
            # architecture (the first sync replaces them).
            from qmath_megatron.models.hf_reference import make_random_hf_model

            dtype = torch.float32 if layout.gpus is None else job.precision.torch_dtype
            model_dir = make_random_hf_model(
                ctx.flavor, Path(job.checkpoint.save) / "engine_init", dtype=dtype
            )
            kwargs["skip_tokenizer_init"] = True
        if layout.gpus is None:
            kwargs.update(CPU_VLLM_DEFAULTS, max_model_len=job.model.seq_length + 8)
        else:  # the trainer's precision: the engine samples what the trainer computes
            kwargs.update(
                gpu_memory_utilization=rl.gpu_memory_utilization,
                dtype=str(job.precision.torch_dtype).removeprefix("torch."),
            )
        if self._listen != "127.0.0.1":  # senders on other nodes connect (nccl)
            kwargs["host"] = self._listen
        engines = RolloutEngines.start(layout, str(model_dir), kwargs)
        # Colocated GPU: asleep until the first step wakes them (every step wakes, syncs,
        # rolls out and puts them back to sleep before the trainer's forward/backward).
        engines.sleep(level=1)
        return engines

    def _load_problems(self) -> list[dict]:
        import json

        path = self.job.data.prompts
        if not path:
            raise ValueError("rl.task=math needs data.prompts (qmath data rl-prompts output)")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def total_iters(self) -> int:
        return self.job.total_iters()

    @classmethod
    def dry_run_extra(cls, job: GRPOJob, plan: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """``--dry-run``: the rollout engines' layout (placement, engines, engine TP, GPUs,
        backend) for a GPU run of the planned trainer world."""
        from qmath_megatron.rl.engines import dry_run_engines, format_dry_run_engines

        info = dry_run_engines(job, plan["world_size"])
        return {"engines": info}, format_dry_run_engines(info)

    def step_tokens(self) -> int:
        return self.job.data.global_batch_size * self.job.rl.group_size * self.job.model.seq_length

    # ---- per step ----------------------------------------------------------------------
    def _prompts(self, step: int) -> tuple[list[list[int]], list[dict] | None]:
        d = self.job.data
        gen = torch.Generator().manual_seed(self.job.train.seed * 100_003 + step)
        if self.job.rl.task == "toy_half_vocab":
            ids = torch.randint(
                0, self.flavor.vocab_size, (d.global_batch_size, d.toy_prompt_tokens), generator=gen
            )
            return ids.tolist(), None
        from qmath_megatron.tokenizer.chat import build_prompt

        order = torch.randperm(len(self.problems), generator=gen)[: d.global_batch_size].tolist()
        chosen = [self.problems[i] for i in order]
        tok = self.engine.tokenizer
        return [
            tok(build_prompt(tok, p["problem"], self.job.rl.mode), add_special_tokens=False)[
                "input_ids"
            ]
            for p in chosen
        ], chosen

    def _rollout(self, step: int) -> tuple[dict, dict[str, float]]:
        """Rank 0: sample, score, advantages. Returns the training tensors and metrics."""
        from qmath_megatron.inference.engine import SamplingParams
        from qmath_megatron.rl.advantages import group_advantages
        from qmath_megatron.rl.weight_sync import StaleSampleError, check_versions

        rl = self.job.rl
        prompts, problems = self._prompts(step)
        stop_ids: tuple[int, ...] = ()
        if rl.task == "math":
            from qmath_megatron.tokenizer.chat import chat_stop_token_ids

            stop_ids = chat_stop_token_ids(self.engine.tokenizer)  # end of the assistant turn
        params = SamplingParams(
            n=rl.group_size,
            temperature=rl.temperature,
            top_p=rl.top_p,
            max_new_tokens=rl.max_new_tokens,
            stop_token_ids=stop_ids,
            seed=self.job.train.seed + step,
        )
        # Every engine must hold the weights just synced (one sender per engine).
        versions = self.engine.weight_versions()
        if any(v != self.sync.version for v in versions):
            raise StaleSampleError(
                f"rollout engines hold weight versions {versions} after the "
                f"sync of version {self.sync.version}"
            )
        wake = time.perf_counter()
        self.engine.wake_up(["kv_cache"])  # colocated GPU: the KV cache back for the rollout
        sleep_wake_s = self._wake_s + time.perf_counter() - wake
        self.engine.reset_usage()
        start = time.perf_counter()
        try:
            if rl.mode == "tir":
                from qmath_megatron.rl.tir import tir_rollouts

                if self.executor is None:
                    from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor

                    self.executor = SandboxExecutor(SandboxConfig())
                # The engines speak the engine protocol: every round is split over them.
                groups = tir_rollouts(self.engine, prompts, params, self.executor)
            else:
                groups = self.engine.generate(prompts, params)
        finally:
            rollout_s = time.perf_counter() - start
            # Colocated GPU: free the engines' memory before the trainer's forward/backward.
            self.engine.sleep(level=1)
            sleep_wake_s += time.perf_counter() - start - rollout_s
        check_versions([c.weight_version for g in groups for c in g], self.sync.version)
        if rl.task == "toy_half_vocab":
            verdict = toy_rewards(groups, self.flavor.vocab_size)
        else:
            verdict = self._check(problems, groups)
        rewards, reward_metrics = math_rewards(verdict, problems, groups, self.scorer, rl.rm_alpha)
        adv = group_advantages(rewards, normalize_std=rl.normalize_std)
        samples = build_samples(prompts, groups, self.job.model.seq_length, 0)
        samples["advantages"] = (rl.advantage_sign * adv.values).flatten()
        lengths = samples["response_length"].float()
        metrics = {
            **reward_metrics,
            "accuracy": float(verdict.mean()),
            "response_length": float(lengths.mean()),
            "zero_variance_groups": float(adv.zero_variance_groups),
            "rollout_s": rollout_s,
            "sleep_wake_s": sleep_wake_s,
            "engines": float(len(self.engine.used)),
            "engine_weight_version_min": float(min(versions)),
            "engine_weight_version_max": float(max(versions)),
        }
        return samples, metrics

    def _check(self, problems: list[dict], groups: list[list[Any]]) -> torch.Tensor:
        from qmath_megatron.rewards.checker import AnswerChecker
        from qmath_megatron.rewards.extract import extract_answer

        if self.checker is None:
            self.checker = AnswerChecker()
        pairs = [
            (str(p["answer"]), extract_answer(c.text))
            for p, g in zip(problems, groups, strict=True)
            for c in g
        ]
        verdicts = [float(r.equal) for r in self.checker.equivalent_many(pairs)]
        return torch.tensor(verdicts).view(len(groups), -1)

    def before_step(self, ctx: TrainContext, state: Any) -> dict[str, float]:
        import torch.distributed as dist

        sleep = self.layout.sleep  # colocated GPU engines sleep while the trainer steps
        start = time.perf_counter()
        if sleep and ctx.is_main:
            self.engine.wake_up(["weights"])  # weights first: the sync overwrites them
        self._wake_s = time.perf_counter() - start
        if sleep:
            dist.barrier()  # every sender's engine is awake
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
                self.sync.close()  # ipc/nccl transfers, while the engines still run
        finally:
            if getattr(self, "engine", None) is not None:
                self.engine.close()
                self.engine = None
        if getattr(self, "checker", None) is not None:
            self.checker.close()
        if getattr(self, "executor", None) is not None:
            self.executor.close()
            self.executor = None
        if getattr(self, "scorer", None) is not None:
            self.scorer.close()
            self.scorer = None


STAGE = Stage(
    name="grpo",
    help="GRPO with vLLM rollout engines that receive the trainer's weights every step",
    task=GRPOTask,
    job_type=GRPOJob,
    recipes=RECIPES,
)

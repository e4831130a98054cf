"""GRPO rollouts on rank 0, between the weight sync and the training tensors: the step's
prompts, sampling through the engines (CoT, or TIR with the code run in the sandbox),
the task's rewards (:mod:`qmath_megatron.rl.reward`), group advantages, and the training
rows (:func:`build_samples`).

Prompts per step: ``data.global_batch_size`` of them, drawn with a generator seeded by
``train.seed * 100003 + step`` (problems: a random choice of ``data.prompts`` rendered with
the chat template in ``rl.mode``; the toy task: random token ids), each sampled
``rl.group_size`` times with seed ``train.seed + step``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from qmath_megatron.inference.engine import GenerationEngine, SamplingParams
from qmath_megatron.inference.sampling import sample
from qmath_megatron.reward_model.scoring import load_scorer
from qmath_megatron.rewards.checker import AnswerChecker
from qmath_megatron.rl.advantages import group_advantages
from qmath_megatron.rl.config import GRPOJob
from qmath_megatron.rl.prepare import load_problems
from qmath_megatron.rl.reward import RewardInputs, RewardTask, compose_rewards
from qmath_megatron.rl.tir import tir_rollouts
from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor
from qmath_megatron.tokenizer.chat import build_prompt, chat_stop_token_ids


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


logger = logging.getLogger(__name__)


def zero_variance_warning(
    groups: int, kl_coef: float, reward: float, iteration: int | None = None
) -> str:
    """The warning of a step whose every group has zero reward variance: every advantage
    is 0, so the step trains nothing but the KL term (if any)."""
    at = f"iteration {iteration}: " if iteration is not None else ""
    effect = (
        "the policy loss and its gradient are 0 (only the KL term trains)"
        if kl_coef
        else "loss and gradient are 0, the step changes nothing"
    )
    return (
        f"{at}all {groups} prompt groups have zero reward variance (mean reward "
        f"{reward:.3f}: every response in a group scored the same), so {effect}; many such "
        "steps: the prompts are too easy or too hard for the policy (qmath data rl-prompts)"
    )


class Rollouts:
    """One GRPO run's rollout side. Every rank builds it; rank 0 (``main``) samples and
    scores, from ``problems`` (the rows :func:`~qmath_megatron.rl.prepare.validate_job`
    checked before the engines started; read and checked here when not given). It opens
    the answer checker and the sandbox on first use, loads the reward model
    (``rl.rm_model``) on rank 0 at once (to fail early), and closes them in :meth:`close`."""

    def __init__(
        self,
        job: GRPOJob,
        reward: RewardTask,
        vocab_size: int,
        main: bool,
        problems: list[dict] | None = None,
    ) -> None:
        self.job, self.reward, self.vocab_size = job, reward, vocab_size
        rl = job.rl
        if reward.problems and main and problems is None:
            problems, _ = load_problems(job.data.prompts, rl.task)
        self.problems = problems if reward.problems else None
        self.checker: Any = None
        self.executor: Any = None
        self.scorer: Any = None
        if rl.rm_model and main:  # rewards are computed on rank 0
            self.scorer = load_scorer(
                rl.rm_model, rl.rm_tokenizer, batch_size=rl.rm_batch_size, mode=rl.mode
            )

    def prompts(
        self, step: int, engine: GenerationEngine
    ) -> tuple[list[list[int]], list[dict] | None]:
        """The step's token-id prompts ``[P]`` and, for a problem task, their problems."""
        d = self.job.data
        gen = torch.Generator().manual_seed(self.job.train.seed * 100_003 + step)
        if not self.reward.problems:
            ids = torch.randint(
                0, self.vocab_size, (d.global_batch_size, d.toy_prompt_tokens), generator=gen
            )
            return ids.tolist(), None
        order = torch.randperm(len(self.problems), generator=gen)[: d.global_batch_size].tolist()
        chosen = [self.problems[i] for i in order]
        tok = engine.tokenizer
        return [
            tok(build_prompt(tok, p["problem"], self.job.rl.mode), add_special_tokens=False)[
                "input_ids"
            ]
            for p in chosen
        ], chosen

    def params(self, step: int, engine: GenerationEngine) -> SamplingParams:
        """The step's sampling parameters (problem tasks stop at the assistant turn's end)."""
        stop_ids = chat_stop_token_ids(engine.tokenizer) if self.reward.problems else ()
        return self.job.rl.sampling().params(
            seed=self.job.train.seed + step, stop_token_ids=stop_ids
        )

    def generate(
        self, engine: GenerationEngine, prompts: list[list[int]], params: SamplingParams
    ) -> list[list[Any]]:
        """``[P][G]`` responses with the engines' log-probs (TIR: split over the engines
        every round, as the engines speak the engine protocol)."""
        return sample(engine, prompts, params, self.job.rl.mode, self._tir)

    def _tir(
        self, engine: GenerationEngine, prompts: Sequence[Any], params: SamplingParams
    ) -> list[list[Any]]:
        if self.executor is None:
            self.executor = SandboxExecutor(SandboxConfig())
        return tir_rollouts(engine, prompts, params, self.executor)

    def score(
        self,
        prompts: list[list[int]],
        problems: list[dict] | None,
        groups: list[list[Any]],
        iteration: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Verdicts, rewards and advantages of the responses: the training tensors (with
        ``advantages`` ``[N]``) and the reward metrics (``zero_variance_groups``: prompts
        whose responses all got the same reward; a warning naming ``iteration`` when that
        is every prompt)."""
        rl = self.job.rl
        if self.reward.problems and self.checker is None:
            self.checker = AnswerChecker()
        verdict = self.reward.verifier(
            RewardInputs(groups, problems, self.vocab_size, self.checker)
        )
        rewards, reward_metrics = compose_rewards(
            verdict, problems, groups, self.scorer, rl.rm_alpha
        )
        adv = group_advantages(rewards, normalize_std=rl.normalize_std)
        if adv.zero_variance_groups == adv.groups:
            mean = float(rewards.mean())
            logger.warning(zero_variance_warning(adv.groups, rl.kl_coef, mean, iteration))
        samples = build_samples(prompts, groups, self.job.model.seq_length, 0)
        samples["advantages"] = (rl.advantage_sign * adv.values).flatten()
        lengths = samples["response_length"].float()
        metrics = {
            **reward_metrics,
            "accuracy": float(verdict.mean()),
            "response_length": float(lengths.mean()),
            "zero_variance_groups": float(adv.zero_variance_groups),
        }
        return samples, metrics

    def close(self) -> None:
        for name in ("checker", "executor", "scorer"):
            obj = getattr(self, name)
            if obj is not None:
                obj.close()
                setattr(self, name, None)

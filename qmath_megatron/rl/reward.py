"""Rewards of GRPO rollouts: the tasks' verifiers (``rl.task``, a registry) and the reward
shaping of the Qwen2.5-Math report (RL stage).

**Tasks.** Each ``rl.task`` is a verifier registered with :func:`register_reward`, as
verl registers its advantage estimators: ``@register_reward("math", problems=True)`` on
a function of the step's rollouts (:class:`RewardInputs`) returning ``[P, G]`` 0/1
verdicts. ``problems`` is the task's structure: its prompts are math problems
(``data.prompts``, rendered with the chat template in ``rl.mode``) and its responses text
(TIR, the reward model and the chat's stop tokens apply); otherwise the prompts are random
token ids and no tokenizer is needed. The GRPO task looks its task up
(:func:`get_reward`) and never branches on its name.

**Shaping.**

    r = sigmoid(alpha * r_m) + (r_v - 1),  alpha = 0.5

``r_v`` in {0, 1} is the rule-based verifier's verdict (the shared answer checker),
``r_m`` the reward model's score. A correct response gets r in (0, 1), a wrong one r in
(-1, 0): any correct response outranks any wrong one whatever the reward model says, and
the reward model orders responses within each class. Without a reward model, r = r_v.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmath_megatron.rewards.extract import extract_answer

if TYPE_CHECKING:  # imported where used: `qmath train grpo --help` reads rl.config, not torch
    import torch

ALPHA = 0.5
# Departure from the report (numerics only): alpha * r_m is clamped to [-30, 30] and the
# sigmoid evaluated in float64. Otherwise a very confident reward model saturates the
# sigmoid to exactly 0 or 1 in floating point and a correct and a wrong response could
# tie at r = 0; sigmoid(+-30) is 1e-13 away from the bounds, far inside float64.
_LOGIT_CLAMP = 30.0


def shaped_reward(
    verifier: torch.Tensor, rm_score: torch.Tensor | None = None, alpha: float = ALPHA
) -> torch.Tensor:
    """Rewards of responses.

    Args:
        verifier: ``[N]`` (any shape) 0/1 verifier verdicts (bool, int or float).
        rm_score: same shape, reward-model scores; ``None``: no reward model (r = r_v).
        alpha: the reward model's temperature (0.5 in the report).

    Returns:
        float64 tensor of the same shape.
    """
    import torch

    r_v = verifier.to(torch.float64)
    if not torch.all((r_v == 0) | (r_v == 1)):
        raise ValueError("verifier rewards must be 0 or 1")
    if rm_score is None:
        return r_v
    if rm_score.shape != verifier.shape:
        raise ValueError(
            f"rm_score shape {tuple(rm_score.shape)} != verifier {tuple(verifier.shape)}"
        )
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    logits = (alpha * rm_score.to(torch.float64)).clamp(-_LOGIT_CLAMP, _LOGIT_CLAMP)
    return torch.sigmoid(logits) + (r_v - 1.0)


def compose_rewards(
    verdict: torch.Tensor,
    problems: list[dict] | None,
    groups: list[list[Any]],
    scorer: Any = None,
    alpha: float = ALPHA,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards ``[P, G]`` (float32) of the rollouts and their logged parts.

    ``verdict``: ``[P, G]`` 0/1 verifier verdicts; ``groups[p][g].text``: the responses;
    ``scorer``: a ``RewardScorer`` (``qmath rm score`` machinery, one batched call for all
    P*G responses) or ``None`` (r = r_v). With a scorer, r = sigmoid(alpha * r_m) + (r_v - 1)
    (:func:`shaped_reward`).
    """
    import torch

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


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class RewardInputs:
    """What a verifier sees of one step's rollouts."""

    groups: list[list[Any]]  # [P][G] responses (.token_ids; .text for problem tasks)
    problems: list[dict] | None  # [P] {"problem", "answer"}; None for token-prompt tasks
    vocab_size: int  # the policy's real vocabulary (no TP padding)
    checker: Any = None  # the answer checker (``equivalent_many``) of problem tasks


Verifier = Callable[[RewardInputs], "torch.Tensor"]


@dataclass(frozen=True)
class RewardTask:
    """A registered ``rl.task``: its verifier and the structure of its prompts."""

    name: str
    verifier: Verifier  # RewardInputs -> [P, G] float 0/1 verdicts (r_v)
    problems: bool  # prompts are math problems (data.prompts), responses text

    def check(self, mode: str, reward_model: bool) -> None:
        """Refuse what is configurable but does not apply to this task, rather than
        silently ignore it (``rl.mode=tir``, ``rl.rm_model``)."""
        if self.problems:
            return
        needs = "|".join(t.name for t in _REWARDS.values() if t.problems)
        if mode == "tir":
            raise ValueError(f"rl.mode=tir needs rl.task={needs} (the model writes code)")
        if reward_model:
            raise ValueError(
                f"rl.rm_model needs rl.task={needs} (the RM scores problem/response text)"
            )


_REWARDS: dict[str, RewardTask] = {}


def register_reward(name: str, *, problems: bool) -> Callable[[Verifier], Verifier]:
    """Register the decorated verifier as ``rl.task=name``."""

    def register(fn: Verifier) -> Verifier:
        if name in _REWARDS:
            raise ValueError(f"rl.task {name!r} registered twice")
        _REWARDS[name] = RewardTask(name, fn, problems)
        return fn

    return register


def reward_names() -> list[str]:
    """The registered ``rl.task`` names, sorted."""
    return sorted(_REWARDS)


def get_reward(name: str) -> RewardTask:
    """The task registered as ``name``; an unknown name lists the registered ones."""
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown rl.task {name!r}; registered: {', '.join(reward_names())}"
        ) from None


@register_reward("toy_half_vocab", problems=False)
def toy_half_vocab(batch: RewardInputs) -> torch.Tensor:
    """The toy verifiable task: 1 when the first sampled token is in the lower half of the
    vocabulary, else 0 (a random model starts near 50%)."""
    import torch

    half = batch.vocab_size // 2
    return torch.tensor([[float(c.token_ids[0] < half) for c in g] for g in batch.groups])


@register_reward("math", problems=True)
def math_answers(batch: RewardInputs) -> torch.Tensor:
    """1 when a response's final answer (:func:`extract_answer`) is equivalent to its
    problem's reference answer under the shared answer checker, else 0."""
    if batch.problems is None or batch.checker is None:
        raise ValueError("rl.task=math needs the problems and an answer checker")
    pairs = [
        (str(p["answer"]), extract_answer(c.text))
        for p, g in zip(batch.problems, batch.groups, strict=True)
        for c in g
    ]
    import torch

    verdicts = [float(r.equal) for r in batch.checker.equivalent_many(pairs)]
    return torch.tensor(verdicts).view(len(batch.groups), -1)

"""GRPO's pure functions against hand-computed values: reward shaping (and the property
that any correct response outranks any wrong one), group advantages, the PPO-clip loss
(both clip sides, asymmetric clip, TIS cap, k3 KL, token-level aggregation), metrics;
the ``rl.task`` reward registry (each task's verdicts on hand-built rollouts, unknown names)
and the toy task's rollouts from prompts to advantages (steps whose groups all have zero
reward variance counted and warned)."""

from __future__ import annotations

import math

import pytest
import torch

from qmath_megatron.rl.advantages import group_advantages
from qmath_megatron.rl.loss import (
    k3_kl,
    logprob_mismatch,
    masked_mean,
    ppo_clip_loss,
    token_entropy,
)
from qmath_megatron.rl.reward import shaped_reward
from qmath_megatron.rl.weight_sync import StaleSampleError, check_versions


def test_reward_hand_values():
    r_v = torch.tensor([1, 0, 1, 0])
    assert shaped_reward(r_v).tolist() == [1.0, 0.0, 1.0, 0.0]  # no reward model: r = r_v
    r = shaped_reward(r_v, torch.tensor([0.0, 0.0, 2.0, -4.0]))
    expected = [0.5, -0.5, 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0)) - 1]
    assert r.tolist() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="0 or 1"):
        shaped_reward(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="shape"):
        shaped_reward(torch.tensor([1, 0]), torch.tensor([1.0]))


def test_any_correct_response_outranks_any_wrong_one():
    gen = torch.Generator().manual_seed(0)
    for scale in (1.0, 10.0, 1e3, 1e9):
        scores = torch.randn(4000, generator=gen, dtype=torch.float64) * scale
        scores[:4] = torch.tensor([float("inf"), -float("inf"), 1e300, -1e300])
        verdict = torch.randint(0, 2, (4000,), generator=gen)
        verdict[:4] = torch.tensor([0, 1, 0, 1])  # the most adversarial pairings
        r = shaped_reward(verdict, scores)
        assert r[verdict == 1].min() > r[verdict == 0].max()
        assert (r[verdict == 1] > 0).all() and (r[verdict == 0] < 0).all()


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0]])
    adv = group_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(1/3); group 2: mean 0.125, std 0.25.
    a = 0.5 / math.sqrt(1 / 3)
    assert adv.values[0].tolist() == pytest.approx([a, -a, a, -a], rel=1e-5)
    assert adv.values[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert adv.values[2].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)
    assert (adv.zero_variance_groups, adv.groups) == (1, 3)
    plain = group_advantages(rewards, normalize_std=False)
    assert plain.values[2].tolist() == pytest.approx([0.375, -0.125, -0.125, -0.125])
    assert plain.values[1].tolist() == [0.0] * 4 and plain.zero_variance_groups == 1
    with pytest.raises(ValueError, match="G>=2"):
        group_advantages(torch.ones(3, 1))


RATIOS = torch.tensor([[1.0, 1.5, 0.5, 1.1]])


def _loss(adv: float, **kw):
    logp = RATIOS.log().clone().requires_grad_(True)
    out = ppo_clip_loss(
        logp, torch.zeros(1, 4), torch.tensor([adv]), kw.pop("mask", torch.ones(1, 4)), **kw
    )
    return logp, out


def test_ppo_clip_both_sides():
    # A > 0: the ratio 1.5 is clipped to 1.2 (no gradient); 0.5 is not clipped (min picks it).
    logp, out = _loss(1.0, mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert float(out.loss_sum.detach()) == pytest.approx(-(1.0 + 1.2 + 0.5))
    assert int(out.tokens) == 3 and int(out.clipped) == 1
    out.loss_sum.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, 0.0, -0.5, 0.0])
    # A < 0: now 0.5 is clipped to 0.8 and 1.5 is not.
    logp, out = _loss(-1.0)
    assert float(out.loss_sum.detach()) == pytest.approx(1.0 + 1.5 + 0.8 + 1.1)
    assert int(out.clipped) == 1
    out.loss_sum.backward()
    assert logp.grad[0].tolist() == pytest.approx([1.0, 1.5, 0.0, 1.1])
    # Separate high clip (clip-higher): 1.5 -> 1.28.
    _, out = _loss(1.0, clip_high=0.28)
    assert float(out.loss_sum.detach()) == pytest.approx(-(1.0 + 1.28 + 0.5 + 1.1))


def test_truncated_importance_sampling_cap():
    behaviour = torch.tensor([[1.0, 1.0, 4.0, 0.25]]).log()  # weights 1, 1, 0.25, 4 -> cap 2
    _, out = _loss(1.0, behaviour_logprobs=behaviour, tis_cap=2.0)
    assert float(out.loss_sum.detach()) == pytest.approx(-(1.0 + 1.2 + 0.5 * 0.25 + 1.1 * 2.0))
    assert int(out.tis_capped) == 1 and float(out.tis_sum) == pytest.approx(1 + 1 + 0.25 + 2)
    with pytest.raises(ValueError, match="behaviour"):
        _loss(1.0, tis_cap=2.0)


def test_k3_kl_penalty():
    d = torch.tensor([[0.0, math.log(2.0)]])
    assert k3_kl(torch.zeros(1, 2), d)[0].tolist() == pytest.approx([0.0, 2 - math.log(2) - 1])
    ref = RATIOS.log() + math.log(2.0)  # k3 = 2 - log 2 - 1 on every token
    _, plain = _loss(1.0, ref_logprobs=ref)
    _, penal = _loss(1.0, ref_logprobs=ref, kl_coef=0.1)
    k = 2 - math.log(2) - 1
    assert float(plain.kl_sum) == pytest.approx(4 * k)
    assert float((penal.loss_sum - plain.loss_sum).detach()) == pytest.approx(0.1 * 4 * k)
    with pytest.raises(ValueError, match="ref_logprobs"):
        _loss(1.0, kl_coef=0.1)


def test_token_level_aggregation_over_the_global_batch():
    """Sum over microbatches / global token count: every token weighs the same, whichever
    response or microbatch it is in (not a mean of per-response means)."""
    gen = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 6, generator=gen) * 0.1
    old = torch.randn(4, 6, generator=gen) * 0.1
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0])
    mask = torch.tensor([[1] * 6, [1] + [0] * 5, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4]).float()
    whole = ppo_clip_loss(logp, old, adv, mask)
    parts = [
        ppo_clip_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2])
        for i in (0, 2)
    ]
    total = sum(p.loss_sum for p in parts) / sum(p.tokens for p in parts)
    assert float(total) == pytest.approx(float(whole.loss_sum / whole.tokens))
    ratio = torch.exp(logp - old)
    ref = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    assert float(whole.loss_sum / whole.tokens) == pytest.approx(float((ref * mask).sum() / 12))
    per_response = ((ref * mask).sum(1) / mask.sum(1)).mean()
    assert abs(float(per_response) - float(whole.loss_sum / whole.tokens)) > 1e-3


def test_metrics():
    assert float(token_entropy(torch.zeros(3, 8))[0]) == pytest.approx(math.log(8))
    assert float(token_entropy(torch.tensor([[0.0, -1e9]]))[0]) == pytest.approx(0.0, abs=1e-6)
    engine = torch.tensor([[0.0, 0.0, 5.0]])
    trainer = torch.tensor([[0.0, math.log(2.0), 0.0]])
    mean, worst = logprob_mismatch(trainer, engine, torch.tensor([[1.0, 1.0, 0.0]]))
    assert (mean, worst) == pytest.approx((1.5, 2.0))
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])) == 2.0


def test_stale_samples_are_refused():
    check_versions([3, 3, 3], 3)
    with pytest.raises(StaleSampleError, match="version 2, not the current 3"):
        check_versions([3, 2, 3], 3)


def test_rollouts_become_training_rows():
    """Labels are the next tokens; the loss mask and behaviour log-probs sit where the
    label is a generated token; tool-output tokens (TIR) are masked; long ones are cut."""
    from types import SimpleNamespace

    from qmath_megatron.rl.rollout import build_samples

    a = SimpleNamespace(token_ids=[7, 8], logprobs=[-0.1, -0.2])
    b = SimpleNamespace(
        token_ids=[9, 10, 11, 12], logprobs=[-1.0, -2.0, -3.0, -4.0], tool_mask=[1, 0, 0, 1]
    )
    s = build_samples([[1, 2, 3]], [[a, b]], seq_length=6, pad_id=0)
    assert s["tokens"].tolist() == [[1, 2, 3, 7, 0, 0], [1, 2, 3, 9, 10, 11]]
    assert s["labels"].tolist() == [[2, 3, 7, 8, 0, 0], [2, 3, 9, 10, 11, 12]]
    assert s["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 1]]
    assert s["behaviour_logprobs"][1].tolist() == [0, 0, -1.0, -2.0, -3.0, -4.0]
    assert s["response_length"].tolist() == [2, 4]
    cut = build_samples([[1, 2, 3]], [[b]], seq_length=4, pad_id=0)  # 3 + 4 > 4 + 1
    assert cut["labels"].tolist() == [[2, 3, 9, 10]] and cut["loss_mask"].tolist() == [[0, 0, 1, 0]]
    with pytest.raises(ValueError, match="no room"):
        build_samples([[1, 2, 3, 4]], [[a]], seq_length=4, pad_id=0)


# ----------------------------------------------------------------------------- rl.task


class RecordingChecker:
    """``equivalent_many`` by string equality, recording the pairs it was asked about."""

    def __init__(self):
        self.pairs = []

    def equivalent_many(self, pairs):
        from types import SimpleNamespace

        self.pairs += pairs
        return [SimpleNamespace(equal=ref == pred) for ref, pred in pairs]


def test_reward_registry_toy_task_hand_values():
    from types import SimpleNamespace

    from qmath_megatron.rl.reward import RewardInputs, get_reward

    task = get_reward("toy_half_vocab")
    assert task.name == "toy_half_vocab" and not task.problems
    firsts = [[2, 7, 4, 5], [9, 0, 5, 4]]  # vocab 10: 1 below 5, else 0
    groups = [[SimpleNamespace(token_ids=[t, 1]) for t in g] for g in firsts]
    verdict = task.verifier(RewardInputs(groups, None, vocab_size=10))
    assert verdict.dtype == torch.float32
    assert verdict.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]


def test_reward_registry_math_task_checks_extracted_answers():
    from types import SimpleNamespace

    from qmath_megatron.rl.reward import RewardInputs, get_reward

    task = get_reward("math")
    assert task.problems
    problems = [{"problem": "3+4?", "answer": 7}, {"problem": "2*4?", "answer": "8"}]
    texts = [["so \\boxed{7}", "The final answer is 8"], ["no answer", "it is \\boxed{8}."]]
    groups = [[SimpleNamespace(text=t) for t in g] for g in texts]
    checker = RecordingChecker()
    verdict = task.verifier(RewardInputs(groups, problems, vocab_size=10, checker=checker))
    # The reference as text, the response's extracted final answer (None: none found).
    assert checker.pairs == [("7", "7"), ("7", "8"), ("8", None), ("8", "8")]
    assert verdict.dtype == torch.float32 and verdict.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="answer checker"):
        task.verifier(RewardInputs(groups, problems, vocab_size=10))


def test_reward_registry_unknown_task_and_what_a_task_refuses():
    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.rl.config import RLConfig
    from qmath_megatron.rl.recipes import tiny_cpu_grpo
    from qmath_megatron.rl.reward import get_reward, register_reward, reward_names

    assert reward_names() == ["math", "toy_half_vocab"]
    known = "registered: math, toy_half_vocab"
    with pytest.raises(ValueError, match=f"unknown rl.task 'nope'; {known}"):
        get_reward("nope")
    with pytest.raises(ValueError, match=f"unknown rl.task 'nope'; {known}"):
        RLConfig(task="nope")
    with pytest.raises(ValueError, match=f"unknown rl.task 'gsm'; {known}"):
        apply_overrides(tiny_cpu_grpo(), ["rl.task=gsm"])
    assert apply_overrides(tiny_cpu_grpo(), ["rl.task=math"]).rl.task == "math"
    with pytest.raises(ValueError, match="'math' registered twice"):
        register_reward("math", problems=True)(lambda batch: batch)
    toy, math_task = get_reward("toy_half_vocab"), get_reward("math")
    with pytest.raises(ValueError, match=r"rl.mode=tir needs rl.task=math \(the model writes"):
        toy.check("tir", reward_model=False)
    with pytest.raises(ValueError, match=r"rl.rm_model needs rl.task=math \(the RM scores"):
        toy.check("cot", reward_model=True)
    toy.check("cot", reward_model=False)
    math_task.check("tir", reward_model=True)


def test_rollouts_of_the_toy_task_prompts_params_and_scores():
    """The toy task through the registry: the step's prompts (seeded), the sampling
    parameters, and verdicts -> rewards (r = r_v) -> group advantages -> training rows."""
    from types import SimpleNamespace

    from qmath_megatron.inference.engine import SamplingParams
    from qmath_megatron.rl.recipes import tiny_cpu_grpo
    from qmath_megatron.rl.reward import get_reward
    from qmath_megatron.rl.rollout import Rollouts

    job = tiny_cpu_grpo()
    rollouts = Rollouts(job, get_reward("toy_half_vocab"), vocab_size=10, main=True)
    assert rollouts.problems is None and rollouts.scorer is None
    prompts, problems = rollouts.prompts(3, engine=None)  # no tokenizer needed
    gen = torch.Generator().manual_seed(job.train.seed * 100_003 + 3)
    assert prompts == torch.randint(0, 10, (4, 8), generator=gen).tolist() and problems is None
    assert rollouts.params(3, engine=None) == SamplingParams(
        n=8, temperature=1.0, top_p=1.0, max_new_tokens=1, seed=job.train.seed + 3
    )

    firsts = [[2, 7, 4, 5], [9, 0, 5, 4]]
    groups = [[SimpleNamespace(token_ids=[t], logprobs=[-0.5]) for t in g] for g in firsts]
    samples, metrics = rollouts.score([[1, 2], [3, 4]], None, groups)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # (r - mean) / (unbiased std + eps), r in {0, 1}
    assert samples["advantages"].tolist() == pytest.approx([a, -a, a, -a, -a, a, -a, a])
    assert samples["tokens"].shape == (8, job.model.seq_length)
    assert samples["loss_mask"].sum() == 8  # one generated token per response
    assert metrics == {
        "reward_verifier": 0.5,
        "reward": 0.5,
        "accuracy": 0.5,
        "response_length": 1.0,
        "zero_variance_groups": 0.0,
    }
    assert rollouts.checker is None  # the toy task checks no answers
    rollouts.close()


def test_a_step_of_zero_variance_groups_is_counted_and_warned(caplog):
    """Every group's responses scoring the same gives all-zero advantages (loss and gradient
    0): the count is logged every step and such a step warns, in one line naming it."""
    from types import SimpleNamespace

    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.rl.recipes import tiny_cpu_grpo
    from qmath_megatron.rl.reward import get_reward
    from qmath_megatron.rl.rollout import Rollouts

    job = tiny_cpu_grpo()
    rollouts = Rollouts(job, get_reward("toy_half_vocab"), vocab_size=10, main=True)

    def score(firsts):
        groups = [[SimpleNamespace(token_ids=[t], logprobs=[-0.5]) for t in g] for g in firsts]
        with caplog.at_level("WARNING", logger="qmath_megatron.rl.rollout"):
            caplog.clear()
            return rollouts.score([[1, 2]] * len(firsts), None, groups, iteration=7)

    # Group 0 all right (reward 1), group 1 all wrong (0): both without variance.
    samples, metrics = score([[1, 2, 3, 4], [9, 8, 7, 6]])
    assert metrics["zero_variance_groups"] == 2.0 and samples["advantages"].abs().sum() == 0
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert record.getMessage().startswith(
        "iteration 7: all 2 prompt groups have zero reward variance (mean reward 0.500"
    )
    assert "loss and gradient are 0, the step changes nothing" in record.getMessage()
    # One informative group: counted, no warning.
    samples, metrics = score([[1, 2, 3, 4], [1, 8, 7, 6]])
    assert metrics["zero_variance_groups"] == 1.0 and caplog.records == []
    assert samples["advantages"].abs().sum() > 0
    # With a KL term the step still trains that term: the warning says so.
    rollouts.job = apply_overrides(job, ["rl.kl_coef=0.01"])
    score([[1, 2, 3, 4], [9, 8, 7, 6]])
    assert "only the KL term trains" in caplog.records[0].getMessage()
    rollouts.close()

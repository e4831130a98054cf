"""GRPO's reward with a reward model: r = sigmoid(alpha * r_m) + (r_v - 1), r_m from the
``qmath rm score`` scorer (a tiny random HF reward model with the real chat template)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from qmath_megatron.rl.reward import compose_rewards
from tests.tiny_models import make_tiny_hf_rm


def test_rewards_are_the_shaped_scores_and_correct_outranks_wrong(tmp_path, tiny_instruct):
    from qmath_megatron.reward_model.scoring import RewardModelScorer

    hf = make_tiny_hf_rm(tmp_path / "rm", tiny_instruct, seed=3, max_positions=512)
    scorer = RewardModelScorer(hf)
    problems = [{"problem": "1+1?", "answer": "2"}, {"problem": "2*3?", "answer": "6"}]
    texts = [["\\boxed{2}", "\\boxed{3}", "so \\boxed{2}"], ["\\boxed{6}", "\\boxed{5}", "no idea"]]
    groups = [[SimpleNamespace(text=t) for t in g] for g in texts]
    verdict = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, metrics = compose_rewards(verdict, problems, groups, scorer, alpha=0.5)

    # Independently: the scorer's score of each (problem, response) and the report's shaping.
    scores = [scorer.score([p["problem"]], [g])[0] for p, g in zip(problems, texts, strict=True)]
    assert len({round(s, 6) for row in scores for s in row}) == 6  # the RM tells them apart
    expected = [
        [1 / (1 + math.exp(-0.5 * s)) + (v - 1) for s, v in zip(srow, vrow, strict=True)]
        for srow, vrow in zip(scores, verdict.tolist(), strict=True)
    ]
    assert rewards.shape == (2, 3) and rewards.dtype == torch.float32
    assert torch.allclose(rewards, torch.tensor(expected), atol=1e-6)
    correct, wrong = rewards[verdict == 1], rewards[verdict == 0]
    assert correct.min() > wrong.max() and (correct > 0).all() and (wrong < 0).all()
    mean_score = sum(s for row in scores for s in row) / 6
    assert math.isclose(metrics["reward_model"], mean_score, rel_tol=1e-5)
    assert metrics["reward_verifier"] == 0.5
    assert math.isclose(metrics["reward"], sum(map(sum, expected)) / 6, rel_tol=1e-5)
    # Without a reward model: r = r_v.
    plain, m = compose_rewards(verdict, problems, groups)
    assert torch.equal(plain, verdict) and "reward_model" not in m

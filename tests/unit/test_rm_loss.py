"""The reward-model loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from qmath_megatron.reward_model.loss import (
    PAD_GROUP,
    group_losses,
    loss_report,
    reward_model_loss,
)


def _hand_loss(pos: list[float], neg: list[float]) -> float:
    """-1/(k m) sum log sigmoid(r_pos - r_neg), written out with math only."""
    total = 0.0
    for p in pos:
        for n in neg:
            total += math.log(1.0 / (1.0 + math.exp(-(p - n))))
    return -total / (len(pos) * len(neg))


def _group(scores: list[float], labels: list[int], gid: int = 0):
    return (
        torch.tensor(scores, dtype=torch.float64),
        torch.tensor(labels, dtype=torch.bool),
        torch.full((len(scores),), gid, dtype=torch.long),
    )


def test_one_pair_at_equal_scores_is_log2():
    s, c, g = _group([0.3, 0.3], [1, 0])
    assert reward_model_loss(s, c, g).item() == pytest.approx(math.log(2), abs=1e-12)


@pytest.mark.parametrize(
    "scores,labels",
    [
        ([1.0, 0.0, 0.5, -1.0, 2.0, 1.0], [1, 0, 0, 0, 0, 0]),  # k = 1 of 6
        ([1.0, 0.0, 0.5, -1.0, 2.0, 1.0], [1, 0, 1, 0, 1, 0]),  # k = 3 of 6
        ([1.0, 0.0, 0.5, -1.0, 2.0, 1.0], [1, 1, 1, 0, 1, 1]),  # k = 5 of 6
    ],
)
def test_k_of_six_matches_hand_computation(scores, labels):
    s, c, g = _group(scores, labels)
    pos = [x for x, y in zip(scores, labels, strict=True) if y]
    neg = [x for x, y in zip(scores, labels, strict=True) if not y]
    out = group_losses(s, c, g)
    assert out.loss.item() == pytest.approx(_hand_loss(pos, neg), abs=1e-12)
    assert (out.positives.item(), out.negatives.item()) == (len(pos), len(neg))
    right = sum(p > n for p in pos for n in neg) / (len(pos) * len(neg))
    assert out.pairwise_accuracy.item() == pytest.approx(right)
    assert out.score_gap.item() == pytest.approx(sum(pos) / len(pos) - sum(neg) / len(neg))
    # the top score 2.0 (index 4) is correct for k=3 and k=5, wrong for k=1
    assert out.best_correct.item() == float(labels[4])


def test_k1_known_number():
    # k=1 of 6: r_pos=1.0 against negatives 0, 0.5, -1, 2, 1
    s, c, g = _group([1.0, 0.0, 0.5, -1.0, 2.0, 1.0], [1, 0, 0, 0, 0, 0])
    # by hand: (1/5)(0.31326 + 0.47408 + 0.12693 + 1.31326 + 0.69315) = 0.58414
    assert reward_model_loss(s, c, g).item() == pytest.approx(0.58414, abs=1e-5)


def test_unequal_groups_are_averaged_per_prompt_with_padding_ignored():
    # group 0: 2 responses (1+,1-); group 1: 4 responses (1+,3-); group 2: 6 (4+,2-);
    # interleaved order and two padding rows that must not count.
    data = [
        (0, 0.2, 1),
        (1, 0.1, 0),
        (2, 1.0, 1),
        (0, -0.4, 0),
        (1, 0.9, 1),
        (PAD_GROUP, 99.0, 1),
        (2, 0.3, 0),
        (1, -2.0, 0),
        (2, 0.7, 1),
        (2, 0.8, 1),
        (1, 0.5, 0),
        (2, -1.0, 0),
        (2, 0.0, 1),
        (PAD_GROUP, -99.0, 0),
    ]
    g = torch.tensor([d[0] for d in data])
    s = torch.tensor([d[1] for d in data], dtype=torch.float64)
    c = torch.tensor([bool(d[2]) for d in data])
    out = group_losses(s, c, g)
    expected = []
    for gid in range(3):
        pos = [d[1] for d in data if d[0] == gid and d[2]]
        neg = [d[1] for d in data if d[0] == gid and not d[2]]
        expected.append(_hand_loss(pos, neg))
    assert out.loss.tolist() == pytest.approx(expected, abs=1e-12)
    assert out.positives.tolist() == [1, 1, 4] and out.negatives.tolist() == [1, 3, 2]
    assert reward_model_loss(s, c, g).item() == pytest.approx(sum(expected) / 3, abs=1e-12)
    loss_sum, count, report = loss_report(out)
    assert int(count) == 3 and loss_sum.item() == pytest.approx(sum(expected))
    assert report["best-of-group accuracy"].tolist() == pytest.approx([3.0, 3.0])


def test_raising_a_positive_lowers_the_loss_and_gradient_signs():
    s = torch.tensor([0.5, 0.1, 0.7, -0.3, 0.2, 0.0], requires_grad=True)
    c = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    g = torch.zeros(6, dtype=torch.long)
    loss = reward_model_loss(s, c, g)
    loss.backward()
    assert (s.grad[c] < 0).all(), "gradient descent must raise positives"
    assert (s.grad[~c] > 0).all(), "and lower negatives"
    with torch.no_grad():
        raised = s.detach().clone()
        raised[0] += 0.5
        assert reward_model_loss(raised, c, g) < loss


def test_ties_best_of_group_takes_the_earliest():
    s, c, g = _group([1.0, 1.0, 0.0], [0, 1, 1])
    assert group_losses(s, c, g).best_correct.item() == 0.0
    s, c, g = _group([1.0, 1.0, 0.0], [1, 0, 0])
    out = group_losses(s, c, g)
    assert out.best_correct.item() == 1.0
    assert out.pairwise_accuracy.item() == pytest.approx(0.5)  # one tie (wrong), one right


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_group_without_positive_or_negative_is_refused(labels):
    s, c, g = _group([0.1, 0.2, 0.3], labels)
    with pytest.raises(ValueError, match="no positive or no negative"):
        group_losses(s, c, g)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"must all be \[N\]"):
        group_losses(torch.zeros(3), torch.zeros(2, dtype=torch.bool), torch.zeros(3))

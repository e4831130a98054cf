"""The Qwen2.5-Math reward-model loss and its metrics: pure functions of scores and labels.

For a prompt ``x`` whose group of responses has ``k`` positives (correct) and ``m``
negatives, the report's listwise loss is

    L(x) = -1/(k*m) * sum over all (pos, neg) pairs of log sigmoid(r(x, y_pos) - r(x, y_neg))

and the training loss is the mean of ``L(x)`` over the prompts of the global batch (all
responses of a group in the same step). :func:`group_losses` computes ``L`` for every
group of a flat batch of responses; the training task sums it per microbatch and divides
by the number of groups of the global batch (``calculate_per_token_loss`` with groups as
the count, see :mod:`qmath_megatron.parallel.schedule`).

Departures from the report: none in the loss. Groups without a positive or without a
negative have no pair (the report drops them); they must be dropped -- and counted --
before training (``qmath data rm-prepare`` does), so this function refuses them instead
of silently giving them zero weight. The metrics are ours: the report names none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PAD_GROUP = -1  # group id of padding rows (ignored everywhere)


@dataclass
class GroupLosses:
    """Per-group values, each ``[G]`` (groups in order of their id ``0..G-1``).

    - ``loss``: ``L(x)`` above (differentiable w.r.t. the scores);
    - ``pairwise_accuracy``: fraction of the group's (pos, neg) pairs with
      ``r_pos > r_neg`` (a tie counts as wrong);
    - ``best_correct``: 1.0 when the highest-scored response is correct (ties: the earliest
      response, the rm@k rule of :mod:`qmath_megatron.evaluation.metrics`);
    - ``score_gap``: mean positive score minus mean negative score;
    - ``positives`` / ``negatives``: ``k`` and ``m``.
    """

    loss: torch.Tensor
    pairwise_accuracy: torch.Tensor
    best_correct: torch.Tensor
    score_gap: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.loss.numel())


def group_losses(
    scores: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor
) -> GroupLosses:
    """The listwise pairwise loss and metrics of every group of a flat batch.

    ``scores``: ``[N]`` float, one reward per response; ``correct``: ``[N]`` bool;
    ``group_ids``: ``[N]`` int64 in ``0..G-1`` naming each response's prompt, or
    :data:`PAD_GROUP` (-1) for padding rows, which are ignored. Every id in ``0..G-1``
    must occur and every group must hold at least one positive and one negative
    (ValueError otherwise). Computed in at least float32 (``scores`` may be bf16); memory is
    ``O(N^2)``, fine for a microbatch of responses.
    """
    if scores.dim() != 1 or correct.shape != scores.shape or group_ids.shape != scores.shape:
        raise ValueError(
            f"scores, correct and group_ids must all be [N]; got {tuple(scores.shape)}, "
            f"{tuple(correct.shape)}, {tuple(group_ids.shape)}"
        )
    real = group_ids != PAD_GROUP
    if bool((group_ids[real] < 0).any()):
        raise ValueError("group ids must be >= 0 (or -1 for padding)")
    num_groups = int(group_ids[real].max().item()) + 1 if bool(real.any()) else 0
    if num_groups == 0:
        raise ValueError("no group in the batch")
    s = scores.to(torch.promote_types(scores.dtype, torch.float32))
    correct = correct.bool() & real
    gids = torch.where(real, group_ids, torch.full_like(group_ids, num_groups))  # pad -> extra bin
    counts_pos = torch.bincount(gids[correct], minlength=num_groups + 1)[:num_groups]
    counts_neg = torch.bincount(gids[real & ~correct], minlength=num_groups + 1)[:num_groups]
    if bool(((counts_pos == 0) | (counts_neg == 0)).any()):
        bad = torch.nonzero((counts_pos == 0) | (counts_neg == 0)).flatten().tolist()
        raise ValueError(
            f"group(s) {bad[:5]} have no positive or no negative response: drop them before "
            "training (qmath data rm-prepare does)"
        )

    # pair[i, j]: i positive, j negative, same group.
    same = (gids[:, None] == gids[None, :]) & real[:, None] & real[None, :]
    pair = same & correct[:, None] & ~correct[None, :]
    diff = s[:, None] - s[None, :]
    zeros = s.new_zeros(())
    pair_loss = torch.where(pair, -F.logsigmoid(diff), zeros)
    pair_right = (pair & (diff > 0)).to(s.dtype)
    k_m = (counts_pos * counts_neg).to(s.dtype)
    # Sum each positive's row, then scatter the rows into their groups.
    bins = s.new_zeros(num_groups + 1)
    loss = bins.index_add(0, gids, pair_loss.sum(dim=1))[:num_groups] / k_m
    right = bins.index_add(0, gids, pair_right.sum(dim=1))[:num_groups] / k_m

    with torch.no_grad():
        pos_sum = bins.index_add(0, gids, torch.where(correct, s, zeros))[:num_groups]
        neg_sum = bins.index_add(0, gids, torch.where(real & ~correct, s, zeros))[:num_groups]
        gap = pos_sum / counts_pos - neg_sum / counts_neg
        # Best of group: the max score, the earliest row on a tie.
        n = s.numel()
        order = torch.arange(n, device=s.device)
        masked = torch.where(real, s.detach(), torch.full_like(s, -float("inf")))
        best_score = torch.full((num_groups + 1,), -float("inf"), device=s.device, dtype=s.dtype)
        best_score = best_score.scatter_reduce(0, gids, masked, reduce="amax")
        is_best = real & (masked == best_score[gids])
        first = torch.full((num_groups + 1,), n, device=s.device, dtype=torch.long)
        first = first.scatter_reduce(0, gids, torch.where(is_best, order, n), reduce="amin")
        best_correct = correct[first[:num_groups]].float()
    return GroupLosses(
        loss=loss,
        pairwise_accuracy=right.detach(),
        best_correct=best_correct,
        score_gap=gap,
        positives=counts_pos,
        negatives=counts_neg,
    )


def reward_model_loss(
    scores: torch.Tensor, correct: torch.Tensor, group_ids: torch.Tensor
) -> torch.Tensor:
    """Scalar training loss of one batch: the mean of :func:`group_losses` over groups."""
    return group_losses(scores, correct, group_ids).loss.mean()


# Report names of the training task (logged as ``rm_loss``, ``pairwise_accuracy``, ...).
LOSS_KEY = "rm loss"
METRIC_KEYS = ("rm loss", "pairwise accuracy", "best-of-group accuracy", "score gap")


def loss_report(groups: GroupLosses) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss_sum, count, report)`` in the shared loss-function contract
    (:mod:`qmath_megatron.parallel.schedule`): the sum of the groups' losses, the number of
    groups, and ``{name: tensor([sum over groups, groups])}`` for each of
    :data:`METRIC_KEYS` (so the reduced means are per-prompt averages)."""
    count = torch.tensor(groups.num_groups, dtype=torch.int, device=groups.loss.device)
    loss_sum = groups.loss.sum()
    n = count.float()
    report = {
        "rm loss": torch.stack([loss_sum.detach(), n]),
        "pairwise accuracy": torch.stack([groups.pairwise_accuracy.sum(), n]),
        "best-of-group accuracy": torch.stack([groups.best_correct.sum(), n]),
        "score gap": torch.stack([groups.score_gap.sum(), n]),
    }
    return loss_sum, count, report

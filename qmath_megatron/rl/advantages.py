"""Group-normalised advantages (GRPO, DeepSeekMath section 4.1.2, outcome supervision).

Each prompt has G sampled responses; a response's advantage is its reward minus the mean
reward of its group, divided by the group's standard deviation (switchable), and applied
to every token of the response.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A group whose rewards differ by less than this is "all equal": its responses teach
# nothing relative to each other, so their advantage is exactly zero.
ZERO_STD = 1e-6


@dataclass(frozen=True)
class Advantages:
    values: torch.Tensor  # [num_groups, G] float32, one advantage per response
    zero_variance_groups: int  # groups whose responses all got the same reward
    groups: int


def group_advantages(
    rewards: torch.Tensor, *, normalize_std: bool = True, eps: float = 1e-6
) -> Advantages:
    """Advantages of ``rewards`` ``[num_groups, G]`` (row = the G responses of one prompt).

    ``A = (r - mean(r)) / (std(r) + eps)`` with the unbiased std (as TRL and verl do), or
    ``A = r - mean(r)`` when ``normalize_std`` is False (Dr. GRPO: the std division
    up-weights near-uniform groups, i.e. questions that are too easy or too hard).
    Departure from DeepSeekMath: groups with zero reward variance get exactly 0 (the paper's
    formula gives 0/eps = 0 too, up to rounding) and are counted, so a step where most
    groups are uninformative is visible in the metrics.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [num_groups, G>=2], got {tuple(rewards.shape)}")
    r = rewards.to(torch.float64)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)
    zero = std[:, 0] < ZERO_STD
    adv = r - mean
    if normalize_std:
        adv = adv / (std + eps)
    adv[zero] = 0.0
    return Advantages(adv.to(torch.float32), int(zero.sum()), r.shape[0])

"""Reward shaping of the Qwen2.5-Math report (RL stage).

    r = sigmoid(alpha * r_m) + (r_v - 1),  alpha = 0.5

``r_v`` in {0, 1} is the rule-based verifier's verdict (the shared answer checker),
``r_m`` the reward model's score. A correct response gets r in (0, 1), a wrong one r in
(-1, 0): any correct response outranks any wrong one whatever the reward model says, and
the reward model orders responses within each class. Without a reward model, r = r_v.
"""

from __future__ import annotations

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

"""On CPU: the shared schedule call slices every microbatch for context
parallelism and the shared reduction sums over the DP x CP group, so a validation loss at
CP=2 equals CP=1. Megatron's local (CPU) attention refuses CP > 1, so the model here is
position-wise (no attention); the real-model check is tests/gpu/test_cp_validation.py."""

from __future__ import annotations

import math

import pytest

from qmath_megatron.parallel.runtime import launch
from tests.distributed.train_workers import cp_eval_microbatches, cp_eval_worker, positionwise_loss

pytestmark = pytest.mark.distributed


def test_cp2_validation_loss_equals_cp1():
    # CP=1: the same sums computed directly, without Megatron.
    total1 = tokens1 = 0.0
    for mb in cp_eval_microbatches():
        losses = positionwise_loss(mb["tokens"], mb["position_ids"], mb["labels"])
        total1 += float((losses * mb["loss_mask"]).sum())
        tokens1 += float(mb["loss_mask"].sum())
    cp2 = launch(cp_eval_worker, 2, 2)
    assert cp2[0] == cp2[1]  # every CP rank reports the same (reduced) values
    total2, tokens2 = cp2[0]["lm loss"]
    assert tokens2 == tokens1 > 0  # each token counted once: sliced, then summed over CP
    assert math.isclose(total2 / tokens2, total1 / tokens1, rel_tol=1e-6), (total1, tokens1, cp2)

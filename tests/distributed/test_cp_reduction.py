"""Issue 11 item 5 on CPU: the shared schedule call slices every microbatch for context
parallelism and the shared reduction sums over the DP x CP group, so a validation loss at
CP=2 equals CP=1. Megatron's local (CPU) attention refuses CP > 1, so the model here is
position-wise (no attention); the real-model check is tests/gpu/test_cp_validation.py."""

from __future__ import annotations

import math

import pytest

from qmath_megatron.parallel.runtime import launch
from tests.distributed.train_workers import cp_eval_worker

pytestmark = pytest.mark.distributed


def test_cp2_validation_loss_equals_cp1():
    (cp1,) = launch(cp_eval_worker, 1, 1)
    cp2 = launch(cp_eval_worker, 2, 2)
    assert cp2[0] == cp2[1]  # every CP rank reports the same (reduced) values
    (total1, tokens1), (total2, tokens2) = cp1["lm loss"], cp2[0]["lm loss"]
    assert tokens2 == tokens1 > 0  # each token counted once: sliced, then summed over CP
    assert math.isclose(total2 / tokens2, total1 / tokens1, rel_tol=1e-6), (cp1, cp2)

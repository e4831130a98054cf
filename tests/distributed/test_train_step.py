"""One optimizer step at TP=2 (and PP=2) equals TP=1: Megatron DDP + distributed optimizer."""

from __future__ import annotations

import math

import pytest

from qmath_megatron.convert.commands import hf_to_mcore
from qmath_megatron.parallel.runtime import launch
from tests.distributed.workers import train_steps_worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ckpt(tiny_hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("step") / "ckpt"
    hf_to_mcore(tiny_hf_models["tiny-untied"], out, tp=1, pp=1)
    return out


@pytest.fixture(scope="module")
def reference(ckpt):
    """Two steps at TP=1 (world 1): every test here compares against this same run."""
    return launch(train_steps_worker, 1, str(ckpt), 1, 1, 2, True)[0]


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_steps_match_single_rank(ckpt, reference, tp, pp):
    parallel = launch(train_steps_worker, tp * pp, str(ckpt), tp, pp, 2, True)[-1]
    _assert_one_step_equal(reference, parallel)


def _assert_one_step_equal(reference, other):
    """Step 0: loss and grad norm; step 1: the loss after the update (same weights)."""
    assert len(reference) == len(other) == 2
    (loss0, norm0, tokens0), (loss1, _, _) = reference
    (other_loss0, other_norm0, other_tokens0), (other_loss1, _, _) = other
    assert tokens0 == other_tokens0 == 4 * 32
    assert _close(loss0, other_loss0), (loss0, other_loss0)
    assert _close(norm0, other_norm0), (norm0, other_norm0)
    assert _close(loss1, other_loss1), (loss1, other_loss1)
    # The step really changed the model (lr 1e-2): a no-op optimizer would fail here.
    assert abs(loss1 - loss0) > 1e-3


def test_data_parallel_matches_single_rank(ckpt, reference):
    """DP=2 (TP=1, world 2) with the distributed optimizer: same global batch, same step."""
    dp = launch(train_steps_worker, 2, str(ckpt), 1, 1, 2, True)[0]
    _assert_one_step_equal(reference, dp)

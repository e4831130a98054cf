"""On GPUs: validation loss of a Transformer-Engine model at CP=2 equals
CP=1 on the same data (the schedule call slices the batch for CP; the reduction includes
the CP group). Context parallelism needs one GPU per CP rank."""

from __future__ import annotations

import math

import pytest
import torch

from qmath_megatron.parallel.runtime import launch
from tests.distributed.train_workers import te_cp_eval_worker


def test_cp2_validation_loss_equals_cp1():
    if torch.cuda.device_count() < 2:
        pytest.skip("context parallelism CP=2 needs 2 GPUs")
    (cp1,) = launch(te_cp_eval_worker, 1, 1)
    cp2 = launch(te_cp_eval_worker, 2, 2)
    assert cp2[0] == cp2[1]
    assert math.isclose(cp2[0], cp1, rel_tol=1e-5), (cp1, cp2)

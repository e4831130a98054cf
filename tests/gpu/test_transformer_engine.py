"""Transformer Engine and FP8 on a GPU (skipped without CUDA + TE)."""

from __future__ import annotations

import math

import pytest

from qmath_megatron.convert.commands import hf_to_mcore
from qmath_megatron.parallel.runtime import launch
from tests.gpu.workers import fp8_steps_worker, te_parity_worker

pytestmark = pytest.mark.gpu


def test_cpu_converted_checkpoint_loads_into_te_spec(tiny_hf_models, tmp_path):
    ckpt = tmp_path / "ckpt"
    hf_to_mcore(tiny_hf_models["tiny-untied"], ckpt)
    # TF32 and TE's fused kernels are not bit-exact: tolerance for fp32 on GPU.
    assert launch(te_parity_worker, 1, str(tiny_hf_models["tiny-untied"]), str(ckpt))[0] < 2e-3


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_training_steps_decrease_loss(recipe):
    losses = launch(fp8_steps_worker, 1, recipe, 20)[0]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses

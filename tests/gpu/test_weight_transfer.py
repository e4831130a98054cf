"""Megatron -> vLLM weight sync over vLLM's GPU backends (skipped without CUDA; needs vLLM):
a random Megatron policy synced into a real vLLM engine running in its own process.

- ipc (colocated): the engine shares the trainer's GPU; it sleeps (level 1) during the
  "training step", wakes its weights for the sync and its KV cache after it.
- nccl (remote): the engine runs on a second GPU. NCCL does not put two ranks of one
  communicator on the same device, so this test needs 2 GPUs and says so otherwise.

After a sync the engine's prompt log-probs equal Megatron's (fp32 <= 1e-4; bf16 tensors
into a bf16 engine within 5e-2), they differ before it, and the version advances.
"""

from __future__ import annotations

import os

import pytest
import torch

from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.models.hf_reference import make_random_hf_model
from qmath_megatron.parallel.runtime import launch

pytestmark = pytest.mark.gpu
REQUIRES = ("vllm",)

# Untied, 2 KV groups, head_dim 32 (as tests/distributed/test_weight_sync.py).
FLAVOR = get_flavor("tiny-tied").replace(
    name="gpu-wsync",
    hidden_size=128,
    ffn_hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    tie_word_embeddings=False,
)
PROMPT = [3, 17, 250, 999, 42, 7, 512, 100, 64, 1]
ENGINE = {"seed": 0, "enforce_eager": True, "max_model_len": 256, "gpu_memory_utilization": 0.2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The engine starts from other random weights than the Megatron policy.
    return make_random_hf_model(FLAVOR, tmp_path_factory.mktemp("gpu_wsync") / "m", seed=99)


def _run(handle, transport: str, dtype: str, sleep: bool) -> dict:
    from tests.distributed.rl_workers import weight_sync_worker

    # One trainer rank (TP = PP = 1) on this GPU, 256 KiB buckets.
    (out,) = launch(
        weight_sync_worker, 1, FLAVOR.to_dict(), 1, 1, handle, PROMPT, transport, 0.25, dtype, sleep
    )
    return out


def _check(out: dict, bound: float) -> None:
    assert out["before_version"] == 0, out
    assert out["before"] > 1e-2 and out["before"] > 2 * out["after1"], out  # other weights
    assert out["after1"] <= bound and out["after1_version"] == 1, out
    assert out["after2"] <= bound and out["after2_version"] == 2, out
    version, nbytes, chunks, engines = out["stats1"]
    assert version == 1 and engines == 1 and chunks >= 1
    assert nbytes >= 2 * FLAVOR.vocab_size * FLAVOR.hidden_size * 2  # embed + lm_head, >= bf16


@pytest.mark.parametrize(("dtype", "bound"), [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_ipc_colocated_sync_with_sleep_and_wake(model_dir, dtype, bound):
    from qmath_megatron.inference.remote import RemoteEngine

    with RemoteEngine(
        model_dir, weight_transfer="ipc", dtype=dtype, enable_sleep_mode=True, **ENGINE
    ) as engine:
        out = _run(engine.handle, "ipc", dtype, sleep=True)
        assert engine.weight_version() == 2
    _check(out, bound)
    # Generation after sleep(level=1) / wake_up() equals before it (weights restored).
    assert out["wake_diff"] <= 1e-6 and out["same_greedy_after_wake"], out


def test_nccl_remote_engine_on_another_gpu(model_dir):
    from qmath_megatron.inference.remote import RemoteEngine

    if torch.cuda.device_count() < 2:
        pytest.skip("nccl: the engine needs its own GPU (NCCL refuses 2 ranks on 1 device)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    second = visible.split(",")[1] if visible else "1"
    with RemoteEngine(
        model_dir,
        weight_transfer="nccl",
        dtype="float32",
        env={"CUDA_VISIBLE_DEVICES": second},
        **ENGINE,
    ) as engine:
        assert engine.handle.workers == 1
        out = _run(engine.handle, "nccl", "float32", sleep=False)
        assert engine.weight_version() == 2
    _check(out, 1e-4)

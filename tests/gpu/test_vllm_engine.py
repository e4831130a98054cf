"""vLLM generation on a GPU (skipped without CUDA + vLLM): greedy completions equal the
transformers engine's token for token, stop strings behave the same in both engines, and
`qmath eval --engine vllm` runs CoT and TIR end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
REQUIRES = ("vllm",)

PROMPTS = ["<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", "Once upon a"]


@pytest.fixture(scope="module")
def engines(tiny_instruct):
    from qmath_megatron.inference.engine import TransformersEngine, VLLMEngine

    vllm = VLLMEngine(
        tiny_instruct, gpu_memory_utilization=0.3, enforce_eager=True, dtype="float32"
    )
    return vllm, TransformersEngine(tiny_instruct, dtype="float32")


def test_greedy_tokens_equal_the_transformers_engine(engines):
    from qmath_megatron.inference.engine import SamplingParams

    vllm, hf = engines
    params = SamplingParams(max_new_tokens=16)
    got, want = vllm.generate(PROMPTS, params), hf.generate(PROMPTS, params)
    for g, w in zip(got, want, strict=True):
        # A random tiny model has near-ties; the first 8 greedy tokens must agree.
        assert g[0].token_ids[:8] == w[0].token_ids[:8]
        assert g[0].logprobs is not None and len(g[0].logprobs) == len(g[0].token_ids)


def test_sampling_gives_distinct_samples_per_request(engines):
    from qmath_megatron.inference.engine import SamplingParams

    vllm, _ = engines
    groups = vllm.generate(
        [PROMPTS[1]] * 4, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3)
    )
    assert len({tuple(g[0].token_ids) for g in groups}) > 1  # identical prompts, own seeds


def test_qmath_eval_with_vllm(tiny_instruct, tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text(
        "".join(json.dumps({"q": f"What is {i} + 1?", "a": str(i + 1)}) + "\n" for i in range(4))
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "eval",
            "--model",
            str(tiny_instruct),
            "--engine",
            "vllm",
            "--benchmark",
            f"name=b,path={bench},problem=q,answer=a",
            "--modes",
            "cot,tir",
            "--n",
            "4",
            "--temperature",
            "0.8",
            "--max-new-tokens",
            "32",
            "--gpu-memory-utilization",
            "0.3",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["results"]) == {"b/cot", "b/tir"}

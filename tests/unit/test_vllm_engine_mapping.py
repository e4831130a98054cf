"""VLLMEngine's translation to and from vLLM's API, against a stand-in `vllm` module (the
real one runs on CPU in test_vllm_cpu_engine.py and on a GPU in tests/gpu): per-prompt
seeds, stop settings, log-probs of the sampled token, stop reasons."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from qmath_megatron.inference.engine import SamplingParams, VLLMEngine, request_seed


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params):
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        self.calls.append((list(prompts), sampling_params))
        outputs = []
        for i, sp in enumerate(sampling_params):
            seqs = []
            for j in range(sp.n):
                ids = [10 + j, 20 + i]
                # Top-k style dicts: an alternative token comes first, the sampled one second.
                lps = [
                    {999: SimpleNamespace(logprob=-9.0), t: SimpleNamespace(logprob=-0.5 * (k + 1))}
                    for k, t in enumerate(ids)
                ]
                stop = "```output" if j == 0 else None
                seqs.append(
                    SimpleNamespace(
                        text=f"p{i}s{j}",
                        token_ids=ids,
                        logprobs=lps,
                        finish_reason="stop",
                        stop_reason=stop,
                    )
                )
            outputs.append(SimpleNamespace(outputs=seqs))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.instances.clear()
    return module


def test_requests_carry_distinct_seeds_and_the_stop_settings(fake_vllm):
    engine = VLLMEngine("/models/m", tensor_parallel_size=2, gpu_memory_utilization=0.8)
    assert FakeLLM.instances[0].kwargs == {
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": "qmath_megatron.inference.vllm_worker.QmathWorkerExtension",
    }
    params = SamplingParams(
        n=2,
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=64,
        seed=5,
        stop=("```output",),
        stop_token_ids=(151645,),
    )
    engine.generate(["same prompt", "same prompt", "other"], params)
    (prompts, sps) = FakeLLM.instances[0].calls[0]
    seeds = [sp.seed for sp in sps]
    # vLLM seeds the n samples of a request seed, seed + 1, ...: requests are n apart, so
    # no sample of one prompt repeats a sample of another.
    assert seeds == [request_seed(5, 2 * i) for i in range(3)]
    children = [s + j for s in seeds for j in range(2)]
    assert len(set(children)) == 6
    # Another call seed (the TIR loop adds the round number) gives other seeds again.
    assert not {request_seed(6, i) for i in range(6)} & set(children)
    sp = sps[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (2, 0.7, 0.9, 64)
    assert sp.stop == ["```output"] and sp.stop_token_ids == [151645] and sp.logprobs == 0


def test_outputs_map_to_completions(fake_vllm):
    engine = VLLMEngine("/models/m")
    groups = engine.generate(["a", "b"], SamplingParams(n=2, temperature=1.0))
    assert [[c.text for c in g] for g in groups] == [["p0s0", "p0s1"], ["p1s0", "p1s1"]]
    c = groups[1][1]
    assert c.token_ids == [11, 21]
    assert c.logprobs == [-0.5, -1.0]  # the sampled token's, not the first dict entry
    assert (groups[0][0].stop_reason, groups[0][1].stop_reason) == ("```output", None)
    assert all(c.finish_reason == "stop" for g in groups for c in g)


class ValidationError(Exception):
    """Like vLLM's VLLMValidationError: not a ValueError."""


class ShortLLM(FakeLLM):
    """vLLM with max_model_len 8: refuses a prompt that leaves no room, without its index."""

    llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=8))

    def get_tokenizer(self):
        return lambda text: {"input_ids": list(range(len(text.split())))}

    def generate(self, prompts, sampling_params):
        for p in prompts:
            n = len(p["prompt_token_ids"]) if isinstance(p, dict) else len(p.split())
            if n >= 8:
                raise ValidationError(
                    f"The decoder prompt (length {n}) plus the number of requested output "
                    "tokens (at least 1) is longer than the maximum model length of 8."
                )
        return super().generate(prompts, sampling_params)


def test_a_prompt_over_max_model_len_is_named(fake_vllm, monkeypatch):
    fake_vllm.LLM = ShortLLM
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    engine = VLLMEngine("/models/m")
    params = SamplingParams(max_new_tokens=4)
    assert len(engine.generate(["a b c", [1, 2, 3]], params)) == 2  # vLLM caps the rest
    with pytest.raises(ValueError, match=r"prompt 2 has 9 tokens.*8 positions \(max_model_len\)"):
        engine.generate(["a b", [1, 2], " ".join("x" * 9)], params)
    with pytest.raises(ValueError, match=r"prompt 0 has 8 tokens"):
        engine.generate([list(range(8)), "ok"], params)

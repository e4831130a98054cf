"""The shared sampling config (inference/sampling.py): its checks, the keys each tool
names in its errors (eval's ``sampling.*``, the data tools' flags, GRPO's ``rl.*``), each
tool's defaults unchanged, the conversion to the engines' parameters, and the CoT/TIR
sampling of math problems that ``qmath data rft`` and ``qmath data rl-prompts`` share."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from qmath_megatron.evaluation.config import EvalSamplingConfig
from qmath_megatron.inference.engine import Completion, SamplingParams
from qmath_megatron.inference.sampling import (
    CLI_KEYS,
    SamplingConfig,
    sample,
    sample_problems,
)
from qmath_megatron.rl.config import RLConfig
from qmath_megatron.rl.prompts import RLPromptsConfig
from qmath_megatron.sft.rft import RFTConfig
from qmath_megatron.tokenizer import chat


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, r"sampling.n and sampling.max_new_tokens must be >= 1"),
        ({"max_new_tokens": 0}, r"sampling.n and sampling.max_new_tokens must be >= 1"),
        ({"n": 2}, r"sampling.n=2 needs sampling.temperature > 0, e.g. 0.7 \(greedy"),
        ({"n": 2, "temperature": -0.5}, r"sampling.n=2 needs sampling.temperature > 0"),
        ({"temperature": -0.5}, r"sampling.temperature must be >= 0 \(0: greedy\)"),
        ({"top_p": 0.0}, r"sampling.top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"sampling.top_p must be in \(0, 1\], got 1.5"),
    ],
)
def test_sampling_config_refuses_what_no_engine_samples(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)
    with pytest.raises(ValueError, match=message):  # the eval section: the same checks
        EvalSamplingConfig(**kwargs)


def test_each_tool_names_its_own_keys():
    with pytest.raises(ValueError, match=r"^--n=2 needs --temperature > 0"):
        SamplingConfig.from_keys(CLI_KEYS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=8)
    with pytest.raises(ValueError, match=r"^--n=8 needs --temperature > 0"):
        RFTConfig(problems=["p.jsonl"], output="o", model="m", temperature=0.0)
    with pytest.raises(ValueError, match=r"^--top-p must be in \(0, 1\]"):
        RLPromptsConfig(problems="p.jsonl", model="m", output="o.jsonl", top_p=2.0)
    with pytest.raises(ValueError, match=r"^--n and --max-new-tokens must be >= 1"):
        RLPromptsConfig(problems="p.jsonl", model="m", output="o.jsonl", max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^rl.group_size=8 needs rl.temperature > 0"):
        RLConfig(temperature=0.0)
    with pytest.raises(ValueError, match=r"^rl.top_p must be in \(0, 1\]"):
        RLConfig(top_p=0.0)
    with pytest.raises(ValueError, match=r"^rl.group_size and rl.max_new_tokens must be >= 1"):
        RLConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"^sampling.n=3 needs sampling.temperature > 0"):
        EvalSamplingConfig(n=3)


def test_each_tool_keeps_its_defaults_and_fields():
    """The flat fields (flags, YAML keys, manifest settings) and defaults stay; the shared
    config is built from them."""
    rft = RFTConfig(problems=["p.jsonl"], output="o", model="m", seed=5)
    assert rft.sampling() == SamplingConfig(8, 0.7, 1.0, 2048, 5)
    rlp = RLPromptsConfig(problems="p.jsonl", model="m", output="o.jsonl")
    assert rlp.sampling() == SamplingConfig(8, 1.0, 1.0, 1024, 0)
    rl = RLConfig(group_size=4, top_p=0.9)
    assert rl.sampling() == SamplingConfig(4, 1.0, 0.9, 1024, 0)
    assert {"group_size", "temperature", "top_p", "max_new_tokens"} <= set(asdict(rl))
    ev = EvalSamplingConfig()
    assert asdict(ev) == {
        "n": 1,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 2048,
        "seed": 0,
        "greedy": True,
    }
    assert list(asdict(ev)) == ["n", "temperature", "top_p", "max_new_tokens", "seed", "greedy"]


def test_params_are_the_engines_per_call_parameters():
    s = SamplingConfig(n=2, temperature=0.5, top_p=0.9, max_new_tokens=7, seed=3)
    assert s.params(stop_token_ids=(5,)) == SamplingParams(
        n=2, temperature=0.5, top_p=0.9, max_new_tokens=7, stop_token_ids=(5,), seed=3
    )
    assert s.params(seed=11, stop=("x",)).seed == 11
    assert s.params(seed=11, stop=("x",)).stop == ("x",)


class RecordingEngine:
    def __init__(self, tokenizer=None):
        self.tokenizer, self.calls = tokenizer, []

    def generate(self, prompts, params):
        self.calls.append((prompts, params))
        return [[Completion(f"r{i}.{j}") for j in range(params.n)] for i in range(len(prompts))]


def test_sample_dispatches_on_the_mode():
    engine, params = RecordingEngine(), SamplingParams(n=2, temperature=1.0)
    out = sample(engine, ["a", "b"], params, "cot")
    assert [[c.text for c in g] for g in out] == [["r0.0", "r0.1"], ["r1.0", "r1.1"]]
    assert engine.calls == [(["a", "b"], params)]
    seen = []

    def loop(eng, prompts, p):
        seen.append((eng, prompts, p))
        return [["tir"]]

    assert sample(engine, ["a"], params, "tir", loop) == [["tir"]]
    assert seen == [(engine, ["a"], params)] and len(engine.calls) == 1
    with pytest.raises(ValueError, match="TIR sampling needs a TIR loop"):
        sample(engine, ["a"], params, "tir")
    with pytest.raises(ValueError, match="mode must be one of cot, tir, got 'pot'"):
        sample(engine, ["a"], params, "pot")


@pytest.fixture(scope="module")
def tok(tiny_instruct):
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    return load_tokenizer(tiny_instruct)


@pytest.mark.parametrize("mode", ["cot", "tir"])
def test_sample_problems_prompts_as_evaluation_does(tok, mode):
    engine = RecordingEngine(tok)
    sampling = SamplingConfig(n=3, temperature=0.7, max_new_tokens=16, seed=1)
    tir_calls = []

    def loop(eng, prompts, params):
        tir_calls.append((prompts, params))
        return eng.generate(prompts, params)

    out = sample_problems(engine, ["What is 1+1?", "2*3?"], mode, sampling, 42, loop)
    ((prompts, params),) = engine.calls
    assert prompts == [chat.build_prompt(tok, p, mode) for p in ["What is 1+1?", "2*3?"]]
    assert params == sampling.params(seed=42, stop_token_ids=chat.chat_stop_token_ids(tok))
    assert params.stop_token_ids and [len(g) for g in out] == [3, 3]
    assert len(tir_calls) == (mode == "tir")

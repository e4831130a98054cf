"""TIR rollouts on token ids (rl/tir.py) with a scripted engine: the sample is [model
tokens, tool-output tokens, model tokens], the tool mask is exactly 0 on the output block
and 1 on model tokens, behaviour log-probs are the engine's on model tokens, and each round
re-sends the exact token ids so far. (Through the real vLLM engine: test_vllm_cpu_engine.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qmath_megatron.evaluation.tir import OUTPUT_STOP
from qmath_megatron.inference.engine import Completion, SamplingParams
from qmath_megatron.rl.rollout import build_samples
from qmath_megatron.rl.tir import tir_rollouts


class ScriptedEngine:
    """Round k answers every request with script[k][request index]: (text, stop or None);
    token ids are the tokenized text plus the stop string (vLLM keeps the stop's tokens)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, params):
        self.calls.append(([list(p) for p in prompts], params))
        round_ = self.script[len(self.calls) - 1]
        out, k = [], 0
        for _ in prompts:
            group = []
            for _ in range(params.n):
                text, stop = round_[k]
                k += 1
                ids = self.tokenizer(text + (stop or ""), add_special_tokens=False)["input_ids"]
                lps = [-0.01 * (t % 97 + 1) for t in ids]
                group.append(Completion(text, ids, lps, "stop", stop, 3))
            out.append(group)
        return out


class FakeExecutor:
    def __init__(self):
        self.codes = []

    def run_many(self, codes):
        self.codes += codes
        return [SimpleNamespace(status="ok", stdout="4\n", stderr="", seconds=0.0) for _ in codes]


@pytest.fixture(scope="module")
def tok(tiny_instruct):
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    return load_tokenizer(tiny_instruct)


def test_tool_output_tokens_are_masked_and_rounds_resend_token_ids(tok):
    first = "Let me compute.\n```python\nprint(2+2)\n```\n"
    script = [
        [(first, OUTPUT_STOP), ("No code: \\boxed{5}.", None)],
        [("So the answer is \\boxed{4}.", None)],
    ]
    engine, executor = ScriptedEngine(tok, script), FakeExecutor()
    prompt = tok("Question: 2+2?\n", add_special_tokens=False)["input_ids"]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=200, seed=1)
    (group,) = tir_rollouts(engine, [prompt], params, executor)
    a, b = group
    assert executor.codes == ["print(2+2)"]

    seg1 = tok(first + OUTPUT_STOP, add_special_tokens=False)["input_ids"]
    tool = tok("\n4\n```\n", add_special_tokens=False)["input_ids"]
    seg2 = tok("So the answer is \\boxed{4}.", add_special_tokens=False)["input_ids"]
    assert a.token_ids == seg1 + tool + seg2
    assert a.tool_mask == [1] * len(seg1) + [0] * len(tool) + [1] * len(seg2)
    assert len(a.logprobs) == len(a.token_ids)
    model_lps = [lp for lp, m in zip(a.logprobs, a.tool_mask, strict=True) if m]
    assert model_lps == [-0.01 * (t % 97 + 1) for t in seg1 + seg2]
    assert a.weight_version == 3 and len(a.executions) == 1 and a.executions[0].output == "4"
    assert "```output\n4\n```" in a.text and a.text.endswith("\\boxed{4}.")
    # The second round re-sent exactly prompt + model tokens + tool tokens, one sample.
    prompts2, params2 = engine.calls[1]
    assert prompts2 == [prompt + seg1 + tool] and params2.n == 1
    assert params2.max_new_tokens == 200 - len(seg1) - len(tool)
    # A sample without code is all model tokens.
    assert b.tool_mask == [1] * len(b.token_ids) and b.executions == []

    # In the training rows the loss mask follows the tool mask at the response positions.
    rows = build_samples([prompt], [group], seq_length=256, pad_id=0)
    start = len(prompt) - 1
    assert rows["loss_mask"][0, start : start + len(a.token_ids)].tolist() == a.tool_mask
    assert rows["loss_mask"][0].sum() == len(seg1) + len(seg2)
    assert (
        rows["tokens"][0, len(prompt) + len(seg1) : len(prompt) + len(seg1) + len(tool)].tolist()
        == tool
    )


def test_the_budget_bounds_model_and_tool_tokens(tok):
    first = "```python\nprint(2+2)\n```\n"
    n1 = len(tok(first + OUTPUT_STOP, add_special_tokens=False)["input_ids"])
    engine = ScriptedEngine(tok, [[(first, OUTPUT_STOP)]])
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=n1 + 2, seed=1)
    ((s,),) = tir_rollouts(engine, [[1, 2, 3]], params, FakeExecutor())
    # The output block fills the budget: no second round, finished by length.
    assert len(engine.calls) == 1 and s.finish_reason == "length"
    assert s.tool_mask[n1:] and not any(s.tool_mask[n1:])

"""The TIR loop with a scripted engine: code blocks are executed (in the real sandbox for
the end-to-end case), their output is fed back, and the loop's limits hold."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qmath_megatron.evaluation.tir import (
    FENCE_STOP,
    OUTPUT_STOP,
    TIRConfig,
    code_blocks,
    format_output,
    run_tir,
)
from qmath_megatron.inference.engine import Completion, SamplingParams, first_stop


class ScriptedEngine:
    """A fake model: ``reply(context)`` gives the text it would write next; stop strings
    are applied as vLLM does (text cut before the stop, ``stop_reason`` set)."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[list[str]] = []

    def generate(self, prompts, params):
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            group = []
            for j in range(params.n):
                text = self.reply(prompt, j)
                hit = first_stop(text, params.stop)
                if hit:
                    group.append(Completion(text[: hit[0]], [1] * 3, None, "stop", hit[1]))
                else:
                    group.append(Completion(text, [1] * 5, None, "stop"))
            out.append(group)
        return out


class EchoExecutor:
    """Runs nothing: reports the code's length, so the loop logic is tested in isolation."""

    def __init__(self):
        self.codes: list[str] = []

    def run_many(self, codes):
        self.codes += codes
        return [
            SimpleNamespace(status="ok", stdout=f"len={len(c)}\n", stderr="", seconds=0.0)
            for c in codes
        ]


PROBLEM = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"


def multiply_model(prompt: str, j: int) -> str:
    """Writes code (and hallucinates its output, as real models do before the stop), then
    answers from the output it was given."""
    if "```output\n42\n```" in prompt:
        return "The program printed 42, so the answer is $\\boxed{42}$."
    return (
        "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n```output\n41\n```\nSo \\boxed{41}."
    )


def test_tir_executes_in_the_sandbox_and_feeds_the_output_back():
    from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor

    engine = ScriptedEngine(multiply_model)
    with SandboxExecutor(SandboxConfig(timeout_s=10, workers=2)) as executor:
        (trajs,) = run_tir(engine, [PROBLEM], SamplingParams(max_new_tokens=64), executor)
    (t,) = trajs
    assert [(e.code, e.status, e.output) for e in t.executions] == [
        ("x = 6 * 7\nprint(x)", "ok", "42")
    ]
    assert t.text == (
        "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```\n```output\n42\n```\n"
        "The program printed 42, so the answer is $\\boxed{42}$."
    )
    assert t.finish_reason == "stop" and t.rounds == 2
    # The second call saw the prompt plus the real output, not the hallucinated one.
    assert engine.calls[1] == [PROBLEM + t.text[: t.text.index("The program")]]


def test_output_stop_runs_the_block_just_closed():
    def model(prompt, j):
        if "```output" in prompt:
            return "Done: \\boxed{3}"
        return "```python\nprint(1 + 2)\n```\n```output\n..."

    executor = EchoExecutor()
    (trajs,) = run_tir(ScriptedEngine(model), [PROBLEM], SamplingParams(), executor, TIRConfig())
    # The fence stop comes first in this text; either way the code runs once.
    assert executor.codes == ["print(1 + 2)"]
    assert trajs[0].text.endswith("```output\nlen=12\n```\nDone: \\boxed{3}")


def test_output_stop_alone():
    def model(prompt, j):
        if "```output" in prompt:
            return "So \\boxed{2}"
        return "```python\nprint(2)\n```" + OUTPUT_STOP  # no newline after the fence

    executor = EchoExecutor()
    (trajs,) = run_tir(ScriptedEngine(model), [PROBLEM], SamplingParams(), executor)
    assert executor.codes == ["print(2)"]
    assert trajs[0].text == "```python\nprint(2)\n```\n```output\nlen=8\n```\nSo \\boxed{2}"


def test_execution_errors_are_fed_back_as_the_error_line():
    result = SimpleNamespace(
        status="error",
        stdout="",
        seconds=0.1,
        stderr=(
            "Traceback (most recent call last):\n  File ...\nZeroDivisionError: division by zero\n"
        ),
    )
    assert format_output(result, 1000) == "ZeroDivisionError: division by zero"
    timeout = SimpleNamespace(status="timeout", stdout="partial", stderr="", seconds=10.0)
    assert format_output(timeout, 1000).startswith("TimeoutError")
    long = SimpleNamespace(status="ok", stdout="x" * 50, stderr="", seconds=0.0)
    assert format_output(long, 10) == "x" * 10 + "\n... (output truncated)"


def test_at_most_max_executions_then_one_final_round():
    calls = {"n": 0}

    def model(prompt, j):  # always writes more code
        calls["n"] += 1
        return f"step\n```python\nprint({calls['n']})\n```\n"

    executor = EchoExecutor()
    (trajs,) = run_tir(
        ScriptedEngine(model), [PROBLEM], SamplingParams(), executor, TIRConfig(max_executions=3)
    )
    t = trajs[0]
    assert len(executor.codes) == 3 and len(t.executions) == 3
    assert t.finish_reason == "max_executions" and t.rounds == 4  # 3 executions + 1 final round
    assert t.text.count("```output") == 3


def test_a_boxed_answer_ends_the_trajectory_even_with_code():
    def model(prompt, j):
        return "The answer is \\boxed{5}.\n```python\nprint(5)\n```\n"

    executor = EchoExecutor()
    (trajs,) = run_tir(ScriptedEngine(model), [PROBLEM], SamplingParams(), executor)
    assert executor.codes == [] and trajs[0].finish_reason == "stop"


def test_fences_of_other_blocks_do_not_run_and_generation_continues():
    def model(prompt, j):
        if prompt.endswith("```\ntable\n```\n"):
            return "Hence \\boxed{1}."
        if prompt.endswith("```\n"):
            return "table" + FENCE_STOP + "after"
        return "A table:" + FENCE_STOP

    executor = EchoExecutor()
    (trajs,) = run_tir(ScriptedEngine(model), [PROBLEM], SamplingParams(), executor)
    assert executor.codes == []
    assert trajs[0].text == "A table:\n```\ntable\n```\nHence \\boxed{1}."
    assert trajs[0].continuations == 2 and trajs[0].finish_reason == "stop"


def test_n_trajectories_per_prompt_are_independent():
    def model(prompt, j):
        if "```output" in prompt:
            return "ok \\boxed{0}"
        return "```python\nprint(0)\n```\n" if "A" in prompt else "no code \\boxed{9}"

    executor = EchoExecutor()
    prompts = ["problem A ", "problem B "]
    out = run_tir(ScriptedEngine(model), prompts, SamplingParams(n=2, temperature=1.0), executor)
    assert [len(g) for g in out] == [2, 2]
    assert [len(t.executions) for g in out for t in g] == [1, 1, 0, 0]
    assert all(t.text.endswith("ok \\boxed{0}") for t in out[0])


@pytest.mark.parametrize(
    "text,blocks,open_lang",
    [
        ("a\n```python\nx=1\n```\nb", [("python", "x=1")], None),
        ("```python\nx=1\nprint(x)", [], "python"),
        ("```\nplain\n```\n```py\ny", [("", "plain")], "py"),
        ("no code", [], None),
    ],
)
def test_code_blocks(text, blocks, open_lang):
    assert code_blocks(text) == (blocks, open_lang)

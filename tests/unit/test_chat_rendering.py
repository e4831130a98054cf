"""One chat rendering for every stage and engine: the transformers engine
and the vLLM engine (a stand-in `vllm` module whose LLM loads the tokenizer the way vLLM
does) expose their tokenizer, and curation, evaluation and SFT render identical text."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from qmath_megatron.curation.llm_steps import SCORE_PROMPT, render, score_texts
from qmath_megatron.evaluation import prompts as eval_prompts
from qmath_megatron.inference.engine import TransformersEngine, VLLMEngine
from qmath_megatron.tokenizer import chat


class FakeLLM:
    """vLLM's LLM as far as the engine uses it: the tokenizer of ``tokenizer=`` or of the
    model directory (vLLM loads it with AutoTokenizer), prompts recorded, fixed output."""

    def __init__(self, model, tokenizer=None, **kwargs):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(tokenizer or model, local_files_only=True)
        self.prompts: list[str] = []

    def get_tokenizer(self):
        return self._tok

    def generate(self, prompts, sampling_params):
        self.prompts += prompts
        out = SimpleNamespace(
            text="Score: 4", token_ids=[1], logprobs=None, finish_reason="stop", stop_reason=None
        )
        return [SimpleNamespace(outputs=[out]) for _ in prompts]


@pytest.fixture(scope="module")
def engines(tiny_instruct):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "vllm", module)
        yield TransformersEngine(tiny_instruct), VLLMEngine(tiny_instruct)


def test_prompts_are_identical_across_engines(engines):
    hf, vllm = engines
    assert vllm.tokenizer is vllm.llm.get_tokenizer()
    content = SCORE_PROMPT.format(text="1 + 1 = 2")
    assert render(hf, content) == render(vllm, content)
    assert render(vllm, content) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        f"assistant.<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    )
    for mode in chat.MODES:
        a = eval_prompts.build_prompt(hf.tokenizer, "What is 2+2?", mode)
        b = eval_prompts.build_prompt(vllm.tokenizer, "What is 2+2?", mode)
        assert (
            a
            == b
            == (
                f"<|im_start|>system\n{chat.SYSTEM_PROMPTS[mode]}<|im_end|>\n<|im_start|>user\n"
                "What is 2+2?<|im_end|>\n<|im_start|>assistant\n"
            )
        )
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat.render_chat(hf.tokenizer, conv) == chat.render_chat(vllm.tokenizer, conv)
    assert chat.chat_stop_token_ids(hf.tokenizer) == chat.chat_stop_token_ids(vllm.tokenizer)
    assert chat.chat_stop_token_ids(vllm.tokenizer) == (151645, 151643)


def test_curation_sends_templated_prompts_through_vllm(engines):
    hf, vllm = engines
    vllm.llm.prompts.clear()
    results = score_texts(vllm, ["some text", "other text"])
    assert [r.score for r in results] == [4, 4]
    expected = [render(hf, SCORE_PROMPT.format(text=t)) for t in ("some text", "other text")]
    assert vllm.llm.prompts == expected
    assert all(p.startswith("<|im_start|>system\n") for p in vllm.llm.prompts)


def test_evaluation_names_are_the_shared_ones():
    assert eval_prompts.build_prompt is chat.build_prompt
    assert eval_prompts.SYSTEM_PROMPTS is chat.SYSTEM_PROMPTS
    assert eval_prompts.COT_SYSTEM_PROMPT.startswith("Please reason step by step")


def test_without_a_template():
    bare = SimpleNamespace(chat_template=None)
    assert chat.render_user_prompt(bare, "x") == "x"  # a base model gets the plain text
    assert chat.render_user_prompt(None, "x") == "x"
    with pytest.raises(ValueError, match="no chat template"):
        chat.build_prompt(bare, "x", "cot")
    with pytest.raises(ValueError, match="unknown prompt mode"):
        chat.prompt_messages("x", "pot")

"""Qwen2.5-Math evaluation prompts: the chat template with the CoT or TIR system prompt.

The system prompts are the ones Qwen2.5-Math-Instruct was trained with (its model card).
"""

from __future__ import annotations

from typing import Literal

Mode = Literal["cot", "tir"]
MODES: tuple[str, ...] = ("cot", "tir")

COT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TIR_SYSTEM_PROMPT = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
SYSTEM_PROMPTS: dict[str, str] = {"cot": COT_SYSTEM_PROMPT, "tir": TIR_SYSTEM_PROMPT}


def build_prompt(tokenizer, problem: str, mode: str) -> str:
    """The prompt text for ``problem``: system + user turns and the assistant header."""
    if mode not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown evaluation mode {mode!r} (cot, tir)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: evaluation prompts use the Qwen2.5 chat "
            "template (build a tokenizer with `qmath tokenizer build --out DIR`)"
        )
    messages = [
        {"role": "system", "content": SYSTEM_PROMPTS[mode]},
        {"role": "user", "content": problem},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids that end an assistant turn: ``<|im_end|>`` (base models prompted with the chat
    template do not list it as end-of-sequence) and the tokenizer's eos."""
    ids = []
    for token in ("<|im_end|>", tokenizer.eos_token):
        if token is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.append(tid)
    return tuple(dict.fromkeys(ids))

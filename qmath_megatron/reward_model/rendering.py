"""What a reward model reads: a conversation ending in the assistant's response, rendered
with the chat template without generation prompt and tokenized without added special
tokens (the published Qwen2.5-Math-RM model card). Training data (``qmath data
rm-prepare``, :mod:`qmath_megatron.reward_model.data`) and scoring
(:mod:`qmath_megatron.reward_model.scoring`) both render through these functions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qmath_megatron.tokenizer import chat


def rm_messages(row: dict[str, Any], where: str = "row", mode: str = "cot") -> list[dict[str, str]]:
    """The conversation a row describes: ``messages`` (ending in an assistant turn), or
    ``prompt`` + ``response`` as [system (the mode's prompt), user, assistant]."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object")
    if "messages" in row:
        try:
            messages = chat.check_messages(row["messages"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: `messages` must end with the assistant's response")
        return messages
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(f"{where}: needs `messages`, or string `prompt` and `response`")
    return [*chat.prompt_messages(prompt, mode), {"role": "assistant", "content": response}]


def render_for_rm(tokenizer: Any, messages: Sequence[dict]) -> str:
    """A conversation ending in the assistant's response as the RM reads it: the chat
    template without generation prompt (the model card's ``add_generation_prompt=False``)."""
    return chat.render_chat(tokenizer, messages, add_generation_prompt=False)


def tokenize_for_rm(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts without added special tokens (the model card's
    ``tokenizer.encode(..., add_special_tokens=False)``), batched."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_for_rm(tokenizer: Any, conversations: Sequence[Sequence[dict]]) -> list[list[int]]:
    """:func:`render_for_rm` then :func:`tokenize_for_rm` of each conversation."""
    return tokenize_for_rm(tokenizer, [render_for_rm(tokenizer, m) for m in conversations])

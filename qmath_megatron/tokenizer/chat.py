"""Chat rendering in one place: the Qwen2.5 chat template, the Qwen2.5-Math system prompts,
and the assistant spans SFT trains on.

Every stage renders conversations through these functions, so evaluation prompts,
curation prompts, SFT samples, RL rollouts and reward-model inputs are the same text for
the same messages, whichever engine (transformers, vLLM) holds the tokenizer:

- :func:`render_chat`: messages -> text, with or without the generation prompt
  (``<|im_start|>assistant\\n``), using the tokenizer's chat template (the Qwen2.5
  template that ``qmath tokenizer build`` writes and Qwen2.5 models ship);
- :func:`build_prompt`: the system + user prompt of a math problem in CoT or TIR mode
  (the system prompts Qwen2.5-Math-Instruct was trained with, from its model card);
- :func:`render_user_prompt`: one user turn, for instruction prompts (curation);
- :func:`assistant_spans`: the character ranges of a rendered conversation that belong
  to the assistant (its content and its closing ``<|im_end|>``), for SFT loss masks;
- :func:`output_block_spans`: the ```` ```output ```` blocks of a TIR assistant turn (what
  the interpreter wrote), which SFT does not train on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from qmath_megatron.tokenizer.qwen import ENDOFTEXT, IM_END

Mode = Literal["cot", "tir"]
MODES: tuple[str, ...] = ("cot", "tir")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

COT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TIR_SYSTEM_PROMPT = (
    "Please integrate natural language reasoning with programs to solve the problem above, "
    "and put your final answer within \\boxed{}."
)
SYSTEM_PROMPTS: dict[str, str] = {"cot": COT_SYSTEM_PROMPT, "tir": TIR_SYSTEM_PROMPT}
OUTPUT_FENCE = "```output"

Message = Mapping[str, Any]


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _require_template(tokenizer: Any) -> None:
    if not has_chat_template(tokenizer):
        raise ValueError(
            "the tokenizer has no chat template: prompts use the Qwen2.5 chat template "
            "(build a tokenizer with `qmath tokenizer build --out DIR`)"
        )


def render_chat(
    tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False
) -> str:
    """``messages`` (``{"role", "content"}`` dicts) rendered with the tokenizer's chat
    template; ``add_generation_prompt`` appends the assistant header a completion follows."""
    _require_template(tokenizer)
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_messages(problem: str, mode: str) -> list[dict[str, str]]:
    """The system (CoT or TIR prompt) and user turns of a math problem."""
    if mode not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown prompt mode {mode!r} (cot, tir)")
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[mode]},
        {"role": "user", "content": problem},
    ]


def build_prompt(tokenizer: Any, problem: str, mode: str) -> str:
    """The prompt text for ``problem``: system + user turns and the assistant header."""
    messages = prompt_messages(problem, mode)
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def render_user_prompt(tokenizer: Any, content: str) -> str:
    """One user turn and the assistant header; ``content`` as is when the tokenizer has no
    chat template (a base model prompted with plain text)."""
    if not has_chat_template(tokenizer):
        return content
    return render_chat(
        tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True
    )


def chat_stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids that end an assistant turn: ``<|im_end|>`` (base models prompted with the chat
    template do not list it as end-of-sequence) and the tokenizer's eos."""
    ids = []
    for token in (IM_END, getattr(tokenizer, "eos_token", None) or ENDOFTEXT):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != getattr(tokenizer, "unk_token_id", None):
            ids.append(tid)
    return tuple(dict.fromkeys(ids))


def check_messages(messages: object) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or ValueError saying what is
    wrong: not a list, a message that is not an object, an unknown role, non-string content,
    a system turn that is not the first."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` is not a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r} (system, user, assistant)")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has no string `content`")
        if role == "system" and i != 0:
            raise ValueError(f"message {i} is a system turn after the first message")
        out.append({"role": role, "content": content})
    return out


def assistant_spans(
    tokenizer: Any, messages: Sequence[Message]
) -> tuple[str, list[tuple[int, int, int]]]:
    """(rendered conversation, ``[(message index, start, end)]``) where ``text[start:end]``
    is assistant turn ``index``'s content followed by its ``<|im_end|>``.

    Found by rendering the conversation up to each assistant turn with the generation
    prompt and up to the end of that turn: the Qwen2.5 template renders a prefix of the
    messages as a prefix of the text, so the turn lies between the two. The role header
    (``<|im_start|>assistant\\n``) and the newline after ``<|im_end|>`` are template text,
    outside the span. Raises ValueError when the template does not render that way.
    """
    text = render_chat(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        upto = render_chat(tokenizer, messages[: i + 1])
        if before is None:  # an assistant first: the template inserts its default system turn
            header = "<|im_start|>assistant\n"
            start = upto.rfind(header)
            before = upto[: start + len(header)] if start >= 0 else None
        content = m["content"]
        if (
            before is None
            or not text.startswith(upto)
            or not upto.startswith(before)
            or not upto[len(before) :].startswith(content + IM_END)
        ):
            raise ValueError(
                "the chat template does not render assistant turns as "
                "`<|im_start|>assistant\\n{content}<|im_end|>` after the earlier turns"
            )
        start = len(before)
        spans.append((i, start, start + len(content) + len(IM_END)))
    return text, spans


def output_block_spans(content: str) -> list[tuple[int, int]]:
    """Character ranges of the ```` ```output ```` blocks in a TIR assistant turn.

    A block starts at the beginning of a line whose stripped text is ```` ```output ````
    and ends after the next line that is a bare ```` ``` ```` fence, including that line's
    newline. Raises ValueError for a block that is never closed.
    """
    spans: list[tuple[int, int]] = []
    start: int | None = None
    pos = 0
    # Lines end at "\n" only (str.splitlines also splits at U+2028 and friends).
    for line in re.findall(r"[^\n]*\n|[^\n]+$", content):
        stripped = line.strip()
        if start is None and stripped == OUTPUT_FENCE:
            start = pos
        elif start is not None and stripped == "```":
            spans.append((start, pos + len(line)))
            start = None
        pos += len(line)
    if start is not None:
        raise ValueError("a ```output block is not closed")
    return spans

"""Qwen2.5-Math evaluation prompts: the chat template with the CoT or TIR system prompt.

The rendering and the system prompts live in :mod:`qmath_megatron.tokenizer.chat` (one
place for evaluation, curation, SFT, RL and reward models); this module keeps the names
evaluation code imports.
"""

from __future__ import annotations

from qmath_megatron.tokenizer.chat import (
    COT_SYSTEM_PROMPT,
    MODES,
    SYSTEM_PROMPTS,
    TIR_SYSTEM_PROMPT,
    Mode,
    build_prompt,
    chat_stop_token_ids,
)

__all__ = [
    "COT_SYSTEM_PROMPT",
    "MODES",
    "SYSTEM_PROMPTS",
    "TIR_SYSTEM_PROMPT",
    "Mode",
    "build_prompt",
    "chat_stop_token_ids",
]

"""What the chat-data prepare tools (``qmath data sft-prepare``, ``qmath data rm-prepare``)
share: the reject reasons of a line before its content is looked at, the error that carries
a reason, the walk over every input line, and the checks of their common arguments. (Their
datasets' ``report.json`` is read by :func:`qmath_megatron.data.indexed.read_dataset_report`.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from qmath_megatron.data.readers import iter_raw_lines, parse_json_line
from qmath_megatron.tokenizer import chat

# Reasons a line is rejected before a tool looks at its fields (the shared reader's; a
# blank line is "empty"). Each tool's reason list starts with these.
LINE_REJECT_REASONS: tuple[str, ...] = (
    "invalid_utf8",  # the line is not UTF-8
    "invalid_json",  # not JSON
    "invalid_unicode",  # a lone surrogate in a string
    "not_an_object",  # JSON, but not an object
    "empty",  # a blank line
)


# Qwen2.5's chat control tokens: inside a turn's text they would be tokenized as the real
# special tokens, ending or opening a turn mid-text (a fake turn the model trains on).
CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def find_control_token(text: str) -> str | None:
    """The first control token found in ``text`` (None when it has none)."""
    return next((t for t in CONTROL_TOKENS if t in text), None)


class LineError(ValueError):
    """A line that cannot become a record; ``reason`` is its reject reason in the report.
    Picklable, so worker processes can return them."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.reason, str(self)))


def iter_input_lines(files: Sequence[Path]) -> Iterator[tuple[Path, int, int, bytes]]:
    """(file, 1-based line, byte offset, raw line) of every line of every input, blank lines
    included (each must end as a record or a reject)."""
    for path in files:
        for line, offset, raw in iter_raw_lines(path):
            if raw is not None:
                yield path, line, offset, raw


def parse_line(raw: bytes, error: type[LineError] = LineError) -> object:
    """The JSON value of a line, or ``error`` with the shared reason names."""
    obj, reason, detail = parse_json_line(raw)
    if reason is not None:
        raise error(reason, detail)
    return obj


def check_prepare_args(
    inputs: Sequence[str], output_prefix: str, seq_length: int, mode: str
) -> None:
    """ValueError (a one-line CLI error) for the arguments both tools take."""
    if not inputs:
        raise ValueError("no --input given")
    if not str(output_prefix).strip() or str(output_prefix).endswith(("/", os.sep)):
        raise ValueError(f"--output-prefix must name a file prefix, got {output_prefix!r}")
    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
    if mode not in chat.MODES:
        raise ValueError(f"--mode must be one of {', '.join(chat.MODES)}, got {mode!r}")

"""What the chat-data prepare tools (``qmath data sft-prepare``, ``qmath data rm-prepare``)
share: the reject reasons of a line before its content is looked at, the error that carries
a reason, the walk over every input line (with the byte limit of a line and the reading of a
truncated compressed input), which earlier outputs a run would replace, and the checks of
their common arguments. (Their datasets' ``report.json`` is read by
:func:`qmath_megatron.data.indexed.read_dataset_report`.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from qmath_megatron.data.readers import (
    LINE_TOO_LONG,
    REJECT_RAW_PREFIX,
    iter_raw_lines,
    line_too_long_detail,
    parse_json_line,
    truncate_utf8,
)
from qmath_megatron.tokenizer import chat

# Reasons a line is rejected before a tool looks at its fields (the shared reader's; a
# blank line is "empty"). Each tool's reason list starts with these.
LINE_REJECT_REASONS: tuple[str, ...] = (
    "invalid_utf8",  # the line is not UTF-8
    "invalid_json",  # not JSON
    "invalid_unicode",  # a lone surrogate in a string
    "not_an_object",  # JSON, but not an object
    "empty",  # a blank line
    LINE_TOO_LONG,  # more bytes than max_line_bytes: rejected unread (raw: its first bytes)
    "truncated_input",  # the unreadable rest of a cut .gz/.zst (allow_truncated)
)

# (file, 1-based line, byte offset, raw line): where a line comes from. ``raw`` is only the
# first bytes of a line over the byte limit, and None for a truncated input's unreadable rest.
Where = tuple[Path, int, int, bytes | None]


# Qwen2.5's chat control tokens: inside a turn's text they would be tokenized as the real
# special tokens, ending or opening a turn mid-text (a fake turn the model trains on).
CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def find_control_token(text: str) -> str | None:
    """The first control token found in ``text`` (None when it has none)."""
    return next((t for t in CONTROL_TOKENS if t in text), None)


class LineError(ValueError):
    """A line that cannot become a record; ``reason`` is its reject reason in the report.
    Picklable, so worker processes can return them."""

    def __init__(self, reason: str, detail: str, raw_bytes: int = -1):
        super().__init__(detail)
        self.reason = reason
        self.raw_bytes = raw_bytes  # the line's full length when only its prefix is kept

    def __reduce__(self):
        return (type(self), (self.reason, str(self), self.raw_bytes))


def iter_input_lines(
    files: Sequence[Path], *, max_line_bytes: int | None = None, allow_truncated: bool = False
) -> Iterator[tuple[Where, LineError | None]]:
    """``(where, None)`` for every line of every input, blank lines included (each must end
    as a record or a reject), or ``(where, error)`` for one rejected before it is parsed:

    - a line of more than ``max_line_bytes`` bytes (without its newline): ``line_too_long``,
      its ``raw`` only the first :data:`~qmath_megatron.data.readers.REJECT_RAW_PREFIX`
      bytes (the error's ``raw_bytes`` gives the full length); never decoded or parsed;
    - with ``allow_truncated``, the unreadable rest of a truncated ``.gz`` / ``.zst``:
      one ``truncated_input`` (``raw`` None) after its readable lines. Without it such an
      input raises :class:`~qmath_megatron.data.readers.CorruptInputError`.
    """
    for path in files:
        for line, offset, raw in iter_raw_lines(path, allow_truncated=allow_truncated):
            if raw is None:
                detail = (
                    f"{path} is truncated or corrupt: what follows byte {offset:,} of its "
                    "decompressed text is unreadable (read with allow_truncated)"
                )
                yield (path, line, offset, None), LineError("truncated_input", detail)
            elif max_line_bytes is not None and len(raw) > max_line_bytes:
                head = truncate_utf8(raw, REJECT_RAW_PREFIX)
                error = LineError(
                    LINE_TOO_LONG, line_too_long_detail(len(raw), max_line_bytes), len(raw)
                )
                yield (path, line, offset, head), error
            else:
                yield (path, line, offset, raw), None


def reject_entry(where: Where, error: LineError, *, offset: bool = True) -> dict:
    """A line of a tool's rejects (or dropped) file: reason, source, line, (offset,) detail
    and the raw line (decoded with replacement characters when not UTF-8; None for a
    truncated input's rest); a line kept only as a prefix also gives ``raw_bytes``."""
    path, line, at, raw = where
    entry: dict = {"reason": error.reason, "source": str(path), "line": line}
    if offset:
        entry["offset"] = at
    entry["detail"] = str(error)
    entry["raw"] = None if raw is None else raw.decode("utf-8", "replace")
    if error.raw_bytes >= 0:
        entry["raw_bytes"] = error.raw_bytes
    return entry


def existing_outputs(dataset: Sequence[Path], side: Sequence[Path]) -> list[Path]:
    """The earlier outputs a run would replace (refused without ``--overwrite``): the
    dataset's files, and its side files (rejects, dropped) only when a dataset file is
    there too. Side files alone are what a run that produced no dataset left to say why
    (e.g. every line rejected): not a dataset, so the next run replaces them."""
    found = [p for p in dataset if p.exists()]
    return [*found, *(p for p in side if p.exists())] if found else []


def parse_line(raw: bytes, error: type[LineError] = LineError) -> object:
    """The JSON value of a line, or ``error`` with the shared reason names."""
    obj, reason, detail = parse_json_line(raw)
    if reason is not None:
        raise error(reason, detail)
    return obj


def check_prepare_args(
    inputs: Sequence[str],
    output_prefix: str,
    seq_length: int,
    mode: str,
    max_line_bytes: int | None = None,
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
    check_max_line_bytes(max_line_bytes)


def check_max_line_bytes(max_line_bytes: int | None) -> None:
    """ValueError unless ``max_line_bytes`` is None (no limit) or a positive int."""
    if max_line_bytes is not None and (
        isinstance(max_line_bytes, bool)
        or not isinstance(max_line_bytes, int)
        or max_line_bytes < 1
    ):
        raise ValueError(f"max_line_bytes must be a positive int or null, got {max_line_bytes!r}")

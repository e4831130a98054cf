"""Reading corpus files (JSONL, JSONL.gz, zstd JSONL, Parquet): the one reader of every data tool.

Every line of an input ends as exactly one :class:`Record` or one :class:`Reject` with a
reason from :data:`REJECT_REASONS`; nothing is dropped silently. The same reason names are
used by every tool (tokenize, decontaminate, dedup, classify, recall, score, synthesize).

Compressed inputs are read to their end-of-stream marker: a truncated or corrupt ``.gz`` /
``.zst`` raises :class:`CorruptInputError` (a ``ValueError`` naming the file), unless the
caller asks for ``allow_truncated``: then the readable part is read and one reject with
reason ``truncated_input`` stands for the unreadable rest.

A line is one ``\\n``-terminated byte string (never ``str.splitlines()``, which also splits
on U+2028, U+2029 and U+0085, all legal inside a JSON string). A blank line is a reject
(``empty``), so the counts of a report add up to the file's line count (``wc -l``, plus one
for a last line without a newline).
"""

from __future__ import annotations

import glob
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REJECT_REASONS = (
    "invalid_json",  # the line is not JSON
    "not_an_object",  # JSON, but not an object
    "missing_text",  # none of the text keys is present
    "non_string_text",  # the text field is not a string
    "invalid_utf8",  # the line is not valid UTF-8
    "invalid_unicode",  # a JSON string holds a lone surrogate ("\ud800"): not encodable text
    "empty",  # a blank line, or the text is empty or only whitespace
    "truncated_input",  # the unreadable rest of a truncated compressed file (allow_truncated)
)

# A line over a tool's byte limit (``max_line_bytes``; None: no limit) is rejected before
# it is decoded or parsed: parsing a huge line costs far more time and memory than reading
# it (one 68 MB line: 87 s and 11 GB in sft-prepare before it failed as too long). Tools
# that set a limit count this reason beside REJECT_REASONS.
LINE_TOO_LONG = "line_too_long"
# The default limit of the tools that take ``max_line_bytes`` (sft-prepare, rm-prepare,
# rl-prompts): 16 MiB, far above any real conversation or problem (a 32K-token sample is
# well under 1 MB) and far below what makes one line cost gigabytes to parse.
DEFAULT_MAX_LINE_BYTES = 16 << 20
# What a rejects file keeps of such a line: its first bytes (and its length in raw_bytes),
# so one huge line does not make a huge rejects file.
REJECT_RAW_PREFIX = 1024

_READ_BYTES = 1 << 20
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")  # "\ud800".."\udfff" in JSON


class CorruptInputError(ValueError):
    """A compressed input is truncated or corrupt (the message names the file)."""


def input_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith((".jsonl.zst", ".jsonl.zstd", ".json.zst", ".ndjson.zst")):
        return "jsonl.zst"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(
        f"unsupported input file {path}: expected .jsonl, .jsonl.gz, .jsonl.zst or .parquet"
    )


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files matching the globs, in sorted order per pattern, each file once (absolute)."""
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        pattern = str(pattern)
        matches = (
            sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        )
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"no input files match {pattern!r}")
        for m in matches:
            path = Path(m).resolve()
            input_format(path)  # refuse unknown formats up front
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


@dataclass
class Record:
    """One good record: its text, the whole JSON object, and where it came from."""

    text: str
    raw_bytes: int  # bytes of the line (with its newline) or of the Parquet text
    obj: dict[str, Any]
    line: int  # 1-based line (row) number in the file; 0 when unknown (a mid-file byte range)
    offset: int = -1  # byte offset of the line in the (decompressed) file; -1 for Parquet


@dataclass
class Reject:
    reason: str
    line: int  # as Record.line
    raw: bytes | None = None
    offset: int = -1
    source: str = ""  # the file (set by the reader)
    raw_bytes: int = -1  # the whole line's length when ``raw`` holds only its prefix
    detail: str = ""  # why, when the reason alone does not say (e.g. the size and the limit)

    def to_json(self, source: str | None = None) -> str:
        """The line written to a ``rejects`` file: reason, source, line, offset and the raw
        line (decoded with replacement characters when it was not UTF-8); a line kept only
        as a prefix also gives its full length (``raw_bytes``), and a ``detail`` when set."""
        raw = self.raw.decode("utf-8", "replace") if self.raw is not None else None
        entry: dict[str, Any] = {
            "reason": self.reason,
            "source": source or self.source,
            "line": self.line or None,
            "offset": self.offset,
            "raw": raw,
        }
        if self.raw_bytes >= 0:
            entry["raw_bytes"] = self.raw_bytes
        if self.detail:
            entry["detail"] = self.detail
        return json.dumps(entry, ensure_ascii=False)


# --------------------------------------------------------------------------- raw lines


def _gzip_chunks(path: Path) -> Iterator[bytes]:
    """Decompress every gzip member incrementally (so a cut file still yields its readable
    part before the error); a member without its end is an error, as is trailing data that
    is neither a member nor zero padding."""
    obj, pending = zlib.decompressobj(31), False
    with open(path, "rb") as f:
        while data := f.read(_READ_BYTES):
            while data:
                if not pending and not data.strip(b"\0"):
                    break  # zero padding after the last member (tape/block writers)
                try:
                    out = obj.decompress(data, 8 * _READ_BYTES)
                except zlib.error as exc:
                    raise CorruptInputError(f"{path}: corrupt gzip file ({exc})") from None
                pending = True
                if out:
                    yield out
                if obj.eof:  # end of a member: the rest (if any) is the next member
                    data, obj, pending = obj.unused_data, zlib.decompressobj(31), False
                else:
                    data = obj.unconsumed_tail
    if pending:
        raise CorruptInputError(f"{path}: truncated gzip file (the last member has no end)")


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompress every frame; a frame without its end (a cut file) is an error, which the
    library's stream reader does not report (it returns a shorter stream)."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, pending = dctx.decompressobj(), False
    with open(path, "rb") as f:
        while data := f.read(_READ_BYTES):
            while data:
                try:
                    out = obj.decompress(data)
                except zstandard.ZstdError as exc:
                    raise CorruptInputError(f"{path}: corrupt zstd file ({exc})") from None
                pending = True
                if out:
                    yield out
                if obj.eof:  # end of a frame: the rest (if any) is the next frame
                    data, obj, pending = obj.unused_data, dctx.decompressobj(), False
                else:
                    data = b""
    if pending:
        raise CorruptInputError(f"{path}: truncated zstd file (the last frame has no end)")


def _split_lines(chunks: Iterator[bytes], start_line: int, start_offset: int):
    """(1-based line, byte offset, line without its newline) from a byte stream."""
    line_no, offset, rest = start_line, start_offset, b""
    for chunk in chunks:
        data = rest + chunk
        pieces = data.split(b"\n")
        rest = pieces.pop()
        for piece in pieces:
            yield line_no, offset, piece
            line_no += 1 if line_no else 0
            offset += len(piece) + 1
    if rest:
        yield line_no, offset, rest


def iter_raw_lines(
    path: str | Path, start: int = 0, end: int = -1, *, allow_truncated: bool = False
) -> Iterator[tuple[int, int, bytes | None]]:
    """``(line, offset, raw line)`` of a JSONL(.gz/.zst) file, or of the byte range
    ``[start, end)`` of a plain one (``line`` is 0 for a range not starting at 0).

    A truncated/corrupt compressed file raises :class:`CorruptInputError`; with
    ``allow_truncated`` its readable lines come first, then one ``(line, offset, None)``
    that marks the unreadable rest.
    """
    path = Path(path)
    fmt = input_format(path)
    if fmt == "jsonl":

        def plain() -> Iterator[bytes]:
            with open(path, "rb") as f:
                f.seek(start)
                remaining = None if end < 0 else end - start
                while remaining is None or remaining > 0:
                    chunk = f.read(
                        _READ_BYTES if remaining is None else min(_READ_BYTES, remaining)
                    )
                    if not chunk:
                        break
                    if remaining is not None:
                        remaining -= len(chunk)
                    yield chunk

        yield from _split_lines(plain(), 1 if start == 0 else 0, start)
        return
    chunks = _gzip_chunks(path) if fmt == "jsonl.gz" else _zstd_chunks(path)
    last = (1, 0)
    try:
        for line, offset, raw in _split_lines(chunks, 1, 0):
            last = (line + 1, offset + len(raw) + 1)
            yield line, offset, raw
    except CorruptInputError:
        if not allow_truncated:
            raise
        yield last[0], last[1], None


# --------------------------------------------------------------------------- records


def _text_of(obj: Any, text_keys: Sequence[str]) -> str:
    """The text, or the reject reason (as a string prefixed by ``!``)."""
    if not isinstance(obj, dict):
        return "!not_an_object"
    for key in text_keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                return "!non_string_text"
            if not value.strip():
                return "!empty"
            return value
    return "!missing_text"


def line_too_long_detail(size: int, limit: int) -> str:
    """The detail of a :data:`LINE_TOO_LONG` reject: the line's size and the limit."""
    return f"{size:,} bytes > the limit of {limit:,}"


def truncate_utf8(raw: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes of ``raw``, without a UTF-8 character cut at the end."""
    head = raw[:limit]
    if len(head) < len(raw):
        for back in range(1, min(4, len(head)) + 1):  # a lead byte's own sequence length
            byte = head[-back]
            if byte < 0x80:
                break
            if byte >= 0xC0:
                need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
                if need > back:
                    head = head[:-back]
                break
    return head


def parse_json_line(raw: bytes, max_bytes: int | None = None) -> tuple[Any, str | None, str]:
    """``(object, None, "")`` for a line holding one JSON value, else ``(None, reason,
    detail)`` with the shared reject reasons (``empty``, ``invalid_utf8``, ``invalid_json``,
    ``invalid_unicode``), or :data:`LINE_TOO_LONG` for a line over ``max_bytes``, checked
    before decoding. Every tool that reads JSONL lines parses them here."""
    if max_bytes is not None and len(raw) > max_bytes:
        return None, LINE_TOO_LONG, line_too_long_detail(len(raw), max_bytes)
    if not raw or raw.isspace():
        return None, "empty", "blank line"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8", "the line is not UTF-8"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, "invalid_json", str(exc)
    # Only a "\ud8xx".."\udfxx" escape can put a surrogate into a str (the UTF-8 decoder
    # refuses encoded ones); pairs are fine, a lone one cannot be written back as UTF-8 and
    # is replaced by one tokenizer and refused by another: one reason everywhere.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_unicode", "a string holds a lone surrogate"
    return obj, None, ""


def parse_line(raw: bytes, text_keys: Sequence[str]) -> tuple[str, dict | None, str | None]:
    """``(text, object, None)`` for a good JSONL line, else ``("", None, reason)``."""
    obj, reason, _ = parse_json_line(raw)
    if reason is not None:
        return "", None, reason
    text = _text_of(obj, text_keys)
    if text.startswith("!"):
        return "", None, text[1:]
    return text, obj, None


def iter_records(
    path: str | Path,
    text_keys: Sequence[str] = ("text",),
    *,
    start: int = 0,
    end: int = -1,
    allow_truncated: bool = False,
    text_only: bool = False,
    max_line_bytes: int | None = None,
) -> Iterator[Record | Reject]:
    """Records of a file (or of one byte range / row-group range of it) in file order;
    every bad line is a :class:`Reject`. For Parquet, ``start``/``end`` are row groups,
    and ``text_only`` reads only the text columns (``Record.obj`` then holds just those).
    A JSONL line over ``max_line_bytes`` (without its newline) is one
    :data:`LINE_TOO_LONG` reject, never parsed, holding only its first
    :data:`REJECT_RAW_PREFIX` bytes."""
    path = Path(path)
    if input_format(path) == "parquet":
        yield from _iter_parquet(path, text_keys, start, end, text_only)
        return
    for line, offset, raw in iter_raw_lines(path, start, end, allow_truncated=allow_truncated):
        if raw is None:
            yield Reject("truncated_input", line, None, offset, str(path))
            continue
        if max_line_bytes is not None and len(raw) > max_line_bytes:
            head = truncate_utf8(raw, REJECT_RAW_PREFIX)
            detail = line_too_long_detail(len(raw), max_line_bytes)
            yield Reject(LINE_TOO_LONG, line, head, offset, str(path), len(raw), detail)
            continue
        text, obj, reason = parse_line(raw, text_keys)
        if reason is not None:
            yield Reject(reason, line, raw, offset, str(path))
        else:
            yield Record(text, len(raw) + 1, obj, line, offset)  # type: ignore[arg-type]


def _iter_parquet(
    path: Path, text_keys: Sequence[str], start: int, end: int, text_only: bool = False
) -> Iterator[Record | Reject]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid for a bad file
        raise CorruptInputError(f"{path}: unreadable Parquet file ({exc})") from None
    end = end if end >= 0 else pf.metadata.num_row_groups
    row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
    for group in range(start, end):
        try:
            columns = [k for k in text_keys if k in pf.schema_arrow.names] if text_only else None
            rows = pf.read_row_group(group, columns=columns).to_pylist()
        except Exception as exc:
            raise CorruptInputError(f"{path}: unreadable row group {group} ({exc})") from None
        for obj in rows:
            row += 1
            obj = {k: v for k, v in obj.items() if v is not None}
            text = _text_of(obj, text_keys)
            if text.startswith("!"):
                raw = json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
                yield Reject(text[1:], row, raw, -1, str(path))
            else:
                yield Record(text, len(text.encode("utf-8")), obj, row)


def count_lines(path: str | Path) -> int:
    """Lines of a JSONL(.gz/.zst) file as the readers count them (rows for Parquet)."""
    if input_format(path) == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in iter_raw_lines(path))

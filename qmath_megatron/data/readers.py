"""Reading corpus shards (JSONL, JSONL.gz, zstd JSONL, Parquet) as deterministic work units.

Every record either yields its text or a reject with a reason; nothing is dropped
silently. Plain JSONL files are split into byte ranges aligned on line starts so that
one large file is still processed in parallel; compressed files and Parquet row groups
are natural units. The unit list depends only on the inputs and the chunk size, never on
the worker count, which is what makes outputs independent of parallelism.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
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
    "empty",  # the text is empty or only whitespace
)


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
    """Files matching the globs, in sorted order per pattern, each file once."""
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
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


@dataclass(frozen=True)
class WorkUnit:
    """A deterministic slice of one input: a byte range of plain JSONL, a whole compressed
    file, or a range of Parquet row groups."""

    index: int
    path: str
    format: str
    start: int = 0  # byte offset (jsonl) or first row group (parquet)
    end: int = -1  # exclusive; -1 = to the end

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "path": self.path,
            "format": self.format,
            "start": self.start,
            "end": self.end,
        }


def _jsonl_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    size = path.stat().st_size
    if size == 0:
        return [(0, 0)]
    ranges, start = [], 0
    with path.open("rb") as f:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                ranges.append((start, size))
                break
            f.seek(target)
            f.readline()  # move to the start of the next line
            end = f.tell()
            ranges.append((start, end))
            start = end
    return ranges


def plan_units(files: Sequence[Path], chunk_bytes: int = 32 * 1024**2) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    for path in files:
        fmt = input_format(path)
        if fmt == "jsonl":
            for start, end in _jsonl_ranges(path, chunk_bytes):
                units.append(WorkUnit(len(units), str(path), fmt, start, end))
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            # One unit per row group: writers size row groups, and it keeps units small.
            groups = pq.ParquetFile(path).metadata.num_row_groups
            for group in range(groups):
                units.append(WorkUnit(len(units), str(path), fmt, group, group + 1))
        else:
            units.append(WorkUnit(len(units), str(path), fmt))
    return units


@dataclass
class Record:
    text: str
    raw_bytes: int


@dataclass
class Reject:
    reason: str
    line: str  # where: "file:line" or "file:row"
    raw: bytes | None = None


def _text_of(obj: Any, text_keys: Sequence[str]) -> str | Reject:
    if not isinstance(obj, dict):
        return Reject("not_an_object", "")
    for key in text_keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                return Reject("non_string_text", "")
            if not value.strip():
                return Reject("empty", "")
            return value
    return Reject("missing_text", "")


def _iter_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    """(line number within the unit's file region, raw line without newline)."""
    if unit.format == "jsonl":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            remaining = unit.end - unit.start
            data = f.read(remaining) if remaining > 0 else b""
        for i, line in enumerate(data.split(b"\n")):
            if line.strip():
                yield i, line
        return
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(unit.path, "rb"))
        if unit.format == "jsonl.gz":
            stream = stack.enter_context(gzip.GzipFile(fileobj=raw))
        else:
            import zstandard

            stream = stack.enter_context(zstandard.ZstdDecompressor().stream_reader(raw))
        for i, line in enumerate(io.BufferedReader(stream)):  # type: ignore[arg-type]
            line = line.rstrip(b"\n")
            if line.strip():
                yield i, line


def iter_unit(unit: WorkUnit, text_keys: Sequence[str]) -> Iterator[Record | Reject]:
    """Records of one work unit in file order; every bad record becomes a :class:`Reject`."""
    if unit.format == "parquet":
        yield from _iter_parquet(unit, text_keys)
        return
    where = f"{unit.path}@{unit.start}"
    for lineno, raw in _iter_lines(unit):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Reject("invalid_utf8", f"{where}:{lineno}", raw)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            yield Reject("invalid_json", f"{where}:{lineno}", raw)
            continue
        text = _text_of(obj, text_keys)
        if isinstance(text, Reject):
            text.line, text.raw = f"{where}:{lineno}", raw
            yield text
        else:
            yield Record(text, len(raw) + 1)


def _iter_parquet(unit: WorkUnit, text_keys: Sequence[str]) -> Iterator[Record | Reject]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    columns = [k for k in text_keys if k in pf.schema_arrow.names]
    end = unit.end if unit.end >= 0 else pf.metadata.num_row_groups
    row = 0
    for group in range(unit.start, end):
        table = pf.read_row_group(group, columns=columns or None)
        n = table.num_rows
        values = {c: table.column(c).to_pylist() for c in columns}
        for i in range(n):
            where = f"{unit.path}:rg{group}:{i}"
            obj = {c: values[c][i] for c in columns if values[c][i] is not None}
            text = _text_of(obj, text_keys)
            if isinstance(text, Reject):
                text.line = where
                yield text
            else:
                yield Record(text, len(text.encode("utf-8")))
        row += n

"""JSONL inputs as the data tools meet them: plain, gzip or zstd files (by suffix) with bad
lines among the good ones, shared by the tests that check no line is lost."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

import zstandard


def write_jsonl(
    path: Path, rows: Sequence[dict], bad: Sequence[bytes] = (), *, bad_at: int, cut: bool = False
) -> None:
    """``rows`` as JSON lines (UTF-8, not escaped) with the ``bad`` lines inserted before
    row ``bad_at``; gzip for a ``.gz`` path, zstd for ``.zst`` (``cut``: only its first two
    thirds, a truncated file); parent folders are created."""
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows]
    lines[bad_at:bad_at] = bad
    data = b"\n".join(lines) + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
        data = data[: len(data) * 2 // 3] if cut else data
    path.write_bytes(data)

"""Helpers shared by the curation tools on top of :mod:`qmath_megatron.data.shards`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from qmath_megatron.data.readers import Record, Reject, expand_inputs, iter_records
from qmath_megatron.data.shards import file_digest


def count_rejects(results: Iterable[Mapping[str, Any]], key: str = "rejected") -> dict[str, int]:
    """Sum of the per-shard ``{reason: count}`` dicts."""
    total: Counter[str] = Counter()
    for r in results:
        total.update(r.get(key, {}))
    return dict(sorted(total.items()))


def write_reject(f: IO[str], item: Reject, rejected: Counter) -> None:
    f.write(item.to_json() + "\n")
    rejected[item.reason] += 1


def dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False)


def read_texts(
    patterns: Sequence[str], text_key: str, *, allow_truncated: bool = False
) -> tuple[list[str], Counter]:
    """Texts of every good record (training seeds), and rejects by reason."""
    texts: list[str] = []
    rejected: Counter[str] = Counter()
    for path in expand_inputs(patterns):
        for item in iter_records(path, [text_key], allow_truncated=allow_truncated):
            if isinstance(item, Record):
                texts.append(item.text)
            else:
                rejected[item.reason] += 1
    return texts, rejected


def files_fingerprint(patterns: Sequence[str] | None) -> list[list[str]] | None:
    """(path, sha256) of every file the globs match: for settings that name input files."""
    if not patterns:
        return None
    return [[str(p), file_digest(p)] for p in expand_inputs(patterns)]


def jsonl_lines(path: str | Path) -> Iterator[bytes]:
    """Lines of a JSONL file this package wrote, split on ``\\n`` only (records may hold
    U+2028/U+2029/U+0085, on which ``str.splitlines()`` would also split)."""
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\n")
            if line:
                yield line


def check_output(output: str) -> None:
    if not str(output).strip():
        raise ValueError("--output must name a directory")

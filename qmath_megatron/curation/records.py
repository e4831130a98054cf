"""Whole records from JSONL(.gz/.zst)/Parquet shards, with bad lines counted by reason."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence

from qmath_megatron.curation.run_decontaminate import _raw_lines
from qmath_megatron.data.readers import expand_inputs


def read_records(patterns: Sequence[str], text_key: str = "text") -> tuple[list[dict], Counter]:
    """Records (dicts with a string ``text_key``) in input order, and rejects by reason."""
    records: list[dict] = []
    rejected: Counter[str] = Counter()
    for path in expand_inputs(patterns):
        for raw in _raw_lines(path):
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rejected["invalid_json_or_utf8"] += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                rejected["missing_or_non_string_text"] += 1
                continue
            records.append(record)
    return records, rejected

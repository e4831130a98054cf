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


def shard_name(path) -> str:
    """Output file name of an input shard: its stem + ``.jsonl`` (compression dropped)."""
    name = path.name
    for suffix in (".gz", ".zst", ".zstd", ".parquet", ".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(suffix)
    return name + ".jsonl"


def run_per_shard(patterns: Sequence[str], out_dir, step: str, process) -> list[dict]:
    """Resumable per-shard driver: ``process(path, tmp_output) -> stats dict`` runs for each
    input shard whose ``out_dir/done/<step>/<shard>.json`` marker is missing; its output is
    renamed to ``out_dir/<step>/<shard>`` before the marker is written. Returns every
    shard's stats (fresh or from the markers), in input order."""
    import os
    from pathlib import Path

    out = Path(out_dir)
    (out / step).mkdir(parents=True, exist_ok=True)
    (out / "done" / step).mkdir(parents=True, exist_ok=True)
    files = expand_inputs(patterns)
    names = [shard_name(p) for p in files]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards with the same name would overwrite each other: {names}")
    stats = []
    for path, name in zip(files, names):
        done = out / "done" / step / f"{name}.json"
        if done.is_file():
            stats.append({**json.loads(done.read_text()), "resumed": True})
            continue
        tmp = out / step / f".{name}.tmp"
        result = {"shard": str(path), **process(path, tmp)}
        os.replace(tmp, out / step / name)
        done.write_text(json.dumps(result))
        stats.append(result)
    return stats

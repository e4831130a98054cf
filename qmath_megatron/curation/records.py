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


def run_per_shard(patterns: Sequence[str], out_dir, step: str, process, *, workers: int = 1,
                  initializer=None, initargs: tuple = ()) -> list[dict]:  # fmt: skip
    """Resumable, optionally parallel per-shard driver.

    ``process(path, tmp_output) -> stats dict`` runs for each input shard whose
    ``out_dir/done/<step>/<shard>.json`` marker is missing; its output is renamed to
    ``out_dir/<step>/<shard>`` before the marker is written. With ``workers > 1`` shards run
    in that many spawned processes (``process`` must then be a module-level function and
    ``initializer(*initargs)`` sets each worker up, e.g. loads a model). Returns every
    shard's stats (fresh or from the markers), in input order."""
    import multiprocessing as mp
    import os
    from pathlib import Path

    out = Path(out_dir)
    (out / step).mkdir(parents=True, exist_ok=True)
    (out / "done" / step).mkdir(parents=True, exist_ok=True)
    files = expand_inputs(patterns)
    names = [shard_name(p) for p in files]
    if len(set(names)) != len(names):
        raise ValueError(f"input shards with the same name would overwrite each other: {names}")
    done = {n: out / "done" / step / f"{n}.json" for n in names}
    todo = [(p, out / step / f".{n}.tmp") for p, n in zip(files, names) if not done[n].is_file()]

    def publish(path, tmp, result) -> None:
        name = shard_name(path)
        os.replace(tmp, out / step / name)
        done[name].write_text(json.dumps({"shard": str(path), **result}))

    if workers > 1 and len(todo) > 1:
        with mp.get_context("spawn").Pool(min(workers, len(todo)), initializer, initargs) as pool:
            for (path, tmp), result in zip(todo, pool.starmap(process, todo)):
                publish(path, tmp, result)
    else:
        if initializer is not None and todo:
            initializer(*initargs)
        for path, tmp in todo:
            publish(path, tmp, process(path, tmp))
    fresh = {str(p) for p, _ in todo}
    stats = []
    for path, name in zip(files, names):
        record = json.loads(done[name].read_text())
        stats.append({**record, "resumed": str(path) not in fresh})
    return stats

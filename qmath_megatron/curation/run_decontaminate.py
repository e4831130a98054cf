"""``qmath data decontaminate``: shards in, ``DIR/kept`` and ``DIR/removed`` out.

One output file per input shard (same name, ``.jsonl``), written under a temporary name and
renamed, then marked done: a rerun skips finished shards. Removed records keep every field
and gain ``decontam_benchmark``, ``decontam_item``, ``decontam_index``, ``decontam_rule``
and ``decontam_score``. Lines that cannot be read (invalid JSON / UTF-8, no text field)
go to ``DIR/rejects`` with a reason; they never stop the run. ``DIR/report.json`` names
every benchmark item that caused removals.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qmath_megatron.curation.decontaminate import BenchmarkIndex
from qmath_megatron.data.readers import expand_inputs, input_format


@dataclass
class DecontamConfig:
    inputs: list[str]
    output: str
    benchmarks: list[str]
    text_key: str = "text"
    workers: int = 1
    lcs_threshold: float = 0.6
    lcs_max_words: int = 256
    ngram: int = 13


@dataclass
class ShardReport:
    shard: str
    kept: int = 0
    removed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    matches: list[dict[str, Any]] = field(default_factory=list)


_INDEX: dict[str, BenchmarkIndex] = {}


def _init(cfg: DecontamConfig) -> None:
    _INDEX["index"] = BenchmarkIndex.from_specs(
        cfg.benchmarks,
        ngram=cfg.ngram,
        lcs_threshold=cfg.lcs_threshold,
        lcs_max_words=cfg.lcs_max_words,
    )


def _raw_lines(path: Path):
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for row in pq.read_table(path).to_pylist():
            yield json.dumps(row, ensure_ascii=False, default=str).encode()
        return
    with open(path, "rb") as raw:
        if fmt == "jsonl.gz":
            stream = gzip.GzipFile(fileobj=raw)
        elif fmt == "jsonl.zst":
            import zstandard

            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            stream = raw
        for line in stream:
            if line.strip():
                yield line.rstrip(b"\n")


def _out_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".zst", ".zstd", ".parquet", ".jsonl", ".json", ".ndjson"):
        name = name.removesuffix(suffix)
    return name + ".jsonl"


def _process(args: tuple[str, str, str]) -> dict:
    path_str, out_dir, text_key = args
    path, out = Path(path_str), Path(out_dir)
    index = _INDEX["index"]
    name = _out_name(path)
    report = ShardReport(shard=str(path))
    rejected: Counter[str] = Counter()
    tmp = {kind: out / kind / f".{name}.tmp" for kind in ("kept", "removed", "rejects")}
    with contextlib.ExitStack() as stack:
        files = {
            kind: stack.enter_context(open(p, "w", encoding="utf-8")) for kind, p in tmp.items()
        }
        for lineno, raw in enumerate(_raw_lines(path)):
            reason, record = None, None
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reason = "invalid_utf8"
            except json.JSONDecodeError:
                reason = "invalid_json"
            if reason is None and not isinstance(record, dict):
                reason = "not_an_object"
            elif reason is None and text_key not in record:
                reason = "missing_text"
            elif reason is None and not isinstance(record[text_key], str):
                reason = "non_string_text"
            if reason:
                rejected[reason] += 1
                line = raw.decode("utf-8", "replace")
                files["rejects"].write(
                    json.dumps({"reason": reason, "line": lineno, "raw": line}) + "\n"
                )
                continue
            match = index.match(record[text_key])
            if match is None:
                report.kept += 1
                files["kept"].write(json.dumps(record, ensure_ascii=False) + "\n")
                continue
            report.removed += 1
            bench_file = match.item.source.rpartition(":")[0]
            record.update(decontam_benchmark=bench_file, decontam_field=match.item.source.rpartition(":")[2],
                          decontam_item=match.item.item_id, decontam_index=match.item.index,
                          decontam_rule=match.rule, decontam_score=round(match.score, 4))  # fmt: skip
            files["removed"].write(json.dumps(record, ensure_ascii=False) + "\n")
            report.matches.append(
                {"benchmark": bench_file, "item": match.item.item_id, "rule": match.rule}
            )
    for kind, p in tmp.items():
        os.replace(p, out / kind / name)
    report.rejected = dict(rejected)
    done = out / "done" / f"{name}.json"
    done.write_text(json.dumps(report.__dict__))
    return report.__dict__


def decontaminate(cfg: DecontamConfig) -> dict:
    """Run (or resume) decontamination; returns the report (also written to DIR/report.json)."""
    start = time.time()
    files = expand_inputs(cfg.inputs)
    names = [_out_name(p) for p in files]
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes:
        raise ValueError(f"input shards would overwrite each other's outputs: {dupes}")
    out = Path(cfg.output)
    for kind in ("kept", "removed", "rejects", "done"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    _init(cfg)  # validates the benchmark specs before any worker starts
    todo = [p for p, n in zip(files, names) if not (out / "done" / f"{n}.json").is_file()]
    jobs = [(str(p), str(out), cfg.text_key) for p in todo]
    if cfg.workers > 1 and len(jobs) > 1:
        with mp.get_context("spawn").Pool(cfg.workers, _init, (cfg,)) as pool:
            for i, r in enumerate(pool.imap(_process, jobs), 1):
                print(
                    f"[{i}/{len(jobs)}] {r['shard']}: kept {r['kept']}, removed {r['removed']}",
                    file=sys.stderr,
                )
    else:
        for i, job in enumerate(jobs, 1):
            r = _process(job)
            print(
                f"[{i}/{len(jobs)}] {r['shard']}: kept {r['kept']}, removed {r['removed']}",
                file=sys.stderr,
            )
    shards = [json.loads((out / "done" / f"{n}.json").read_text()) for n in names]
    by_item: Counter[tuple[str, str, str]] = Counter()
    rejected: Counter[str] = Counter()
    for s in shards:
        rejected.update(s["rejected"])
        by_item.update((m["benchmark"], m["item"], m["rule"]) for m in s["matches"])
    report = {
        "kept": sum(s["kept"] for s in shards),
        "removed": sum(s["removed"] for s in shards),
        "rejected": dict(rejected),
        "removed_by_rule": dict(Counter(rule for (_, _, rule) in by_item.elements())),
        "matched_items": [
            {"benchmark": b, "item": i, "rule": r, "records_removed": n}
            for (b, i, r), n in by_item.most_common()
        ],
        "shards": len(shards),
        "resumed_shards": len(files) - len(todo),
        "seconds": round(time.time() - start, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

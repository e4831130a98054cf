"""``qmath data decontaminate``: shards in, ``DIR/kept``, ``DIR/removed``, ``DIR/rejects`` out.

Runs on :mod:`qmath_megatron.data.shards`: one output file per input under each kind,
named by the input's path relative to the common root of the inputs; resumable; a rerun
with other benchmarks (or edited benchmark files), inputs or settings is refused unless
``--overwrite``. Removed records keep every field and gain ``decontam_benchmark``,
``decontam_field``, ``decontam_item``, ``decontam_index``, ``decontam_rule`` and
``decontam_score``. Unreadable lines go to ``DIR/rejects`` with a reason. ``DIR/report.json``
names every benchmark item that caused removals.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qmath_megatron.curation.decontaminate import BenchmarkIndex
from qmath_megatron.curation.records import check_output, count_rejects, dumps, write_reject
from qmath_megatron.data.readers import Reject
from qmath_megatron.data.shards import Shard, ShardJob, ShardOutput, discover, path_fingerprint
from qmath_megatron.data.shards import plan as plan_shards


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
    overwrite: bool = False
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0 < self.lcs_threshold <= 1:
            raise ValueError(f"--lcs-threshold must be in (0, 1], got {self.lcs_threshold}")
        if self.lcs_max_words < 0:
            raise ValueError(f"--lcs-max-words must be >= 0, got {self.lcs_max_words}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if not self.benchmarks:
            raise ValueError("give at least one --benchmark FILE:FIELD")


def _init(cfg: DecontamConfig) -> dict:
    index = BenchmarkIndex.from_specs(
        cfg.benchmarks,
        ngram=cfg.ngram,
        lcs_threshold=cfg.lcs_threshold,
        lcs_max_words=cfg.lcs_max_words,
    )
    return {"index": index, "text_key": cfg.text_key, "allow_truncated": cfg.allow_truncated}


def decontaminate_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    """One shard: each record to kept or removed, each bad line to rejects."""
    index: BenchmarkIndex = state["index"]
    kept = removed = 0
    rejected: Counter[str] = Counter()
    matches: list[dict] = []
    with out.open("kept") as fk, out.open("removed") as fr, out.open("rejects") as fj:
        for item in shard.records([state["text_key"]], allow_truncated=state["allow_truncated"]):
            if isinstance(item, Reject):
                write_reject(fj, item, rejected)
                continue
            match = index.match(item.text)
            if match is None:
                kept += 1
                fk.write(dumps(item.obj) + "\n")
                continue
            removed += 1
            bench_file, _, bench_field = match.item.source.rpartition(":")
            record = {
                **item.obj,
                "decontam_benchmark": bench_file,
                "decontam_field": bench_field,
                "decontam_item": match.item.item_id,
                "decontam_index": match.item.index,
                "decontam_rule": match.rule,
                "decontam_score": round(match.score, 4),
            }
            fr.write(dumps(record) + "\n")
            matches.append(
                {"benchmark": bench_file, "item": match.item.item_id, "rule": match.rule}
            )
    return {"kept": kept, "removed": removed, "rejected": dict(rejected), "matches": matches}


def decontaminate(cfg: DecontamConfig) -> dict:
    """Run (or resume) decontamination; returns the report (also written to DIR/report.json)."""
    start = time.time()
    check_output(cfg.output)
    shards = plan_shards(discover(cfg.inputs))
    _init(cfg)  # validates the benchmark files before any work
    bench = {}
    for spec in cfg.benchmarks:
        bench[spec] = path_fingerprint(spec.rpartition(":")[0])
    settings = {
        "benchmarks": bench,
        "text_key": cfg.text_key,
        "lcs_threshold": cfg.lcs_threshold,
        "lcs_max_words": cfg.lcs_max_words,
        "ngram": cfg.ngram,
        "allow_truncated": cfg.allow_truncated,
    }
    out = Path(cfg.output)
    job = ShardJob(
        "decontaminate",
        out,
        ("kept", "removed", "rejects"),
        settings,
        overwrite=cfg.overwrite,
        extra_outputs=[out / "report.json"],
    )
    run = job.open(shards, hash_threads=cfg.workers)
    shard_results = run.map(
        "decontaminate",
        decontaminate_shard,
        workers=cfg.workers,
        init=_init,
        init_args=(cfg,),
        describe=lambda s, r: f"kept {r['kept']}, removed {r['removed']}",
    )
    by_item: Counter[tuple[str, str, str]] = Counter()
    for s in shard_results:
        by_item.update((m["benchmark"], m["item"], m["rule"]) for m in s["matches"])
    report = {
        "kept": sum(s["kept"] for s in shard_results),
        "removed": sum(s["removed"] for s in shard_results),
        "rejected": count_rejects(shard_results),
        "removed_by_rule": dict(Counter(rule for (_, _, rule) in by_item.elements())),
        "matched_items": [
            {"benchmark": b, "item": i, "rule": r, "records_removed": n}
            for (b, i, r), n in by_item.most_common()
        ],
        "shards": len(shards),
        "resumed_shards": run.resumed["decontaminate"],
        "seconds": round(time.time() - start, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

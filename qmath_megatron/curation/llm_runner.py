"""``qmath data score`` / ``qmath data synthesize`` on :mod:`qmath_megatron.data.shards`.

Each worker process holds one engine. On GPU machines worker ``i`` is pinned to GPU
``i % n_gpus`` (``CUDA_VISIBLE_DEVICES`` is set before CUDA initialises in the fresh
process), so ``--workers`` = number of GPUs runs one engine per GPU over different shards.
The fingerprint covers the model directory, the engine, the batch size and the prompts, so a
rerun with another ``--model`` is refused instead of reusing the old shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qmath_megatron.curation.llm_steps import (
    EXTRACT_PROMPT,
    REFINE_PROMPT,
    SCORE_PROMPT,
    score_texts,
    synthesize_texts,
)
from qmath_megatron.curation.records import check_output, count_rejects, dumps, write_reject
from qmath_megatron.data.readers import Record, Reject
from qmath_megatron.data.shards import Shard, ShardJob, ShardOutput, discover, path_fingerprint
from qmath_megatron.data.shards import plan as plan_shards
from qmath_megatron.inference.engine import make_engine
from qmath_megatron.inference.progress import ShardProgress, stderr_log


@dataclass
class LLMStepConfig:
    inputs: list[str]
    output: str
    model: str
    engine: str = "auto"  # auto | vllm | transformers
    batch_size: int = 64
    workers: int = 1
    text_key: str = "text"
    id_key: str = "id"
    overwrite: bool = False
    allow_truncated: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "vllm", "transformers"):
            raise ValueError(f"--engine must be auto, vllm or transformers, got {self.engine!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


def init_worker(cfg: LLMStepConfig, gpus: int, engine=None) -> dict:
    """Per-worker state: one engine (built here unless given, e.g. by tests)."""
    identity = mp.current_process()._identity
    if gpus and identity:  # a pool worker: one GPU each
        os.environ["CUDA_VISIBLE_DEVICES"] = str((identity[0] - 1) % gpus)
    if engine is None:
        engine = make_engine(cfg.model, cfg.engine)
    return {"engine": engine, "cfg": cfg}


def _batches(shard: Shard, cfg: LLMStepConfig, rejects, rejected: Counter):
    batch: list[Record] = []
    for item in shard.records([cfg.text_key], allow_truncated=cfg.allow_truncated):
        if isinstance(item, Reject):
            write_reject(rejects, item, rejected)
            continue
        batch.append(item)
        if len(batch) >= cfg.batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def score_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    """Records -> ``scored/<name>`` with ``quality_score`` (null when unparseable)."""
    cfg: LLMStepConfig = state["cfg"]
    hist: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    unparseable = []
    progress = ShardProgress(shard, "documents")
    with out.open("scored") as f, out.open("rejects") as fj:
        for chunk in _batches(shard, cfg, fj, rejected):
            for r, res in zip(chunk, score_texts(state["engine"], [x.text for x in chunk])):
                hist[str(res.score)] += 1
                if res.score is None:
                    unparseable.append({"id": r.obj.get(cfg.id_key), "answer": res.raw[:200]})
                f.write(dumps({**r.obj, "quality_score": res.score}) + "\n")
            done = sum(hist.values())
            stderr_log(f"  {shard.name}: {done:,} scored" + progress.status(done, chunk[-1]))
    return {
        "scored": sum(hist.values()),
        "histogram": dict(hist),
        "unparseable": unparseable,
        "rejected": dict(rejected),
    }


def synthesize_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    """Records -> QA rows in ``qa/<name>`` (``source_id``); documents without a pair go to
    ``no_pairs/<name>``, so every input line is accounted for."""
    cfg: LLMStepConfig = state["cfg"]
    rejected: Counter[str] = Counter()
    documents = pairs = empty = 0
    progress = ShardProgress(shard, "documents")
    with out.open("qa") as f, out.open("no_pairs") as fn, out.open("rejects") as fj:
        for chunk in _batches(shard, cfg, fj, rejected):
            ids = [str(r.obj.get(cfg.id_key, f"{shard.file.rel}:{r.line}")) for r in chunk]
            # Positions as ids inside the call: documents with equal ids stay apart.
            positions = [str(i) for i in range(len(chunk))]
            qa, _ = synthesize_texts(state["engine"], [r.text for r in chunk], positions)
            with_pairs = {int(row["source_id"]) for row in qa}
            for row in qa:
                row["source_id"] = ids[int(row["source_id"])]
            for i, r in enumerate(chunk):
                if i not in with_pairs:
                    fn.write(dumps(r.obj) + "\n")
                    empty += 1
            documents += len(chunk)
            pairs += len(qa)
            for row in qa:
                f.write(dumps(row) + "\n")
            stderr_log(
                f"  {shard.name}: {documents:,} documents, {pairs:,} QA pairs"
                + progress.status(documents, chunk[-1])
            )
    return {
        "documents": documents,
        "qa_pairs": pairs,
        "documents_without_pairs": empty,
        "rejected": dict(rejected),
    }


def _prompts_digest() -> str:
    text = "\0".join((SCORE_PROMPT, EXTRACT_PROMPT, REFINE_PROMPT))
    return hashlib.sha256(text.encode()).hexdigest()


def _run(
    tool: str,
    kinds: tuple[str, ...],
    process: Callable,
    cfg: LLMStepConfig,
    describe: Callable,
    engine=None,
) -> tuple[list[dict], int, Path]:
    check_output(cfg.output)
    shards = plan_shards(discover(cfg.inputs))
    out = Path(cfg.output)
    settings = {
        "model": path_fingerprint(cfg.model),
        "engine": cfg.engine,
        "batch_size": cfg.batch_size,
        "text_key": cfg.text_key,
        "id_key": cfg.id_key,
        "prompts": _prompts_digest(),
        "allow_truncated": cfg.allow_truncated,
    }
    job = ShardJob(
        tool, out, kinds, settings, overwrite=cfg.overwrite, extra_outputs=[out / "report.json"]
    )
    run = job.open(shards, hash_threads=cfg.workers)
    gpus = 0
    if engine is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    results = run.map(
        tool,
        process,
        workers=cfg.workers if engine is None else 1,
        init=init_worker,
        init_args=(cfg, gpus, engine),
        describe=describe,
    )
    return results, run.resumed[tool], out


def score(cfg: LLMStepConfig, engine=None) -> dict:
    """Run (or resume) ``qmath data score``; returns the report (also DIR/report.json)."""
    start = time.time()
    shards, resumed, out = _run(
        "score",
        ("scored", "rejects"),
        score_shard,
        cfg,
        lambda s, r: f"{r['scored']:,} documents",
        engine,
    )
    hist: Counter[str] = Counter()
    for s in shards:
        hist.update(s["histogram"])
    unparseable = [u for s in shards for u in s["unparseable"]]
    report = {
        "scored": sum(s["scored"] for s in shards),
        "histogram": dict(sorted(hist.items())),
        "unparseable": len(unparseable),
        "unparseable_examples": unparseable[:20],
        "rejected": count_rejects(shards),
        "resumed_shards": resumed,
        "seconds": round(time.time() - start, 2),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def synthesize(cfg: LLMStepConfig, engine=None) -> dict:
    """Run (or resume) ``qmath data synthesize``; returns the report (also DIR/report.json)."""
    start = time.time()
    shards, resumed, out = _run(
        "synthesize",
        ("qa", "no_pairs", "rejects"),
        synthesize_shard,
        cfg,
        lambda s, r: f"{r['qa_pairs']:,} QA pairs",
        engine,
    )
    report = {
        k: sum(s[k] for s in shards) for k in ("documents", "qa_pairs", "documents_without_pairs")
    }
    report.update(
        rejected=count_rejects(shards),
        resumed_shards=resumed,
        seconds=round(time.time() - start, 2),
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report

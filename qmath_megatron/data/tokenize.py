"""Tokenize corpora into one Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Same bytes as the straightforward way (per-document ``tokenizer.encode`` + ``<|endoftext|>``
+ megatron-core's ``IndexedDatasetBuilder.add_document``), produced faster:

- inputs are split into deterministic work units (:mod:`qmath_megatron.data.readers`);
- N worker processes tokenize whole batches of documents (tiktoken fast path verified
  against HF, :mod:`qmath_megatron.data.fast_tokenizer`) and write each unit's tokens with
  one ``write`` per batch into a shard ``.bin``/``.idx`` (megatron's own index writer);
- shards are concatenated in unit order with ``IndexedDatasetBuilder.add_index``, so the
  output does not depend on N.

Resumable: each finished shard is published by renaming, and recorded by a ``.done`` file
written last; a restarted run re-plans, checks that the plan is the same, and skips done
units. The final ``PREFIX.bin``/``.idx`` appear by rename only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmath_megatron.data.indexed import merge_datasets, write_index
from qmath_megatron.data.readers import (
    REJECT_REASONS,
    Reject,
    WorkUnit,
    expand_inputs,
    iter_unit,
    plan_units,
)

logger = logging.getLogger(__name__)

BATCH_DOCS = 256  # documents tokenized per call: amortises Python overhead


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """As megatron-core's ``DType.optimal_dtype``: uint16 below 65,500 tokens, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class TokenizeConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    workers: int = 1
    text_keys: list[str] = field(default_factory=lambda: ["text"])
    chunk_mb: float = 32
    append_eod: bool = True
    keep_shards: bool = False
    rejects_file: str | None = None
    max_bad_fraction: float = 1.0  # fail the run above this fraction of bad records
    progress: bool = True
    fast_path: bool = True


@dataclass
class UnitResult:
    index: int
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    rejects: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> UnitResult:
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------- workers

_STATE: dict[str, Any] = {}


def _init_worker(spec) -> None:
    from qmath_megatron.data.fast_tokenizer import BatchTokenizer

    _STATE["tok"] = BatchTokenizer(spec)  # verified by the parent; rebuilt in ~0.1 s


def _shard_prefix(work: Path, index: int) -> Path:
    return work / f"shard_{index:06d}"


def _process_unit(args: tuple[dict, str, list[str], bool, bool]) -> UnitResult:
    """Tokenize one unit into ``work/shard_N.{bin,idx}``; publish by rename; then ``.done``."""
    unit_dict, work_dir, text_keys, append_eod, write_rejects = args
    unit = WorkUnit(**unit_dict)
    tok = _STATE["tok"]
    dtype = optimal_dtype(tok.vocab_size)
    work = Path(work_dir)
    prefix = _shard_prefix(work, unit.index)
    tmp_bin, tmp_idx = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
    result = UnitResult(unit.index)
    rejects: Counter[str] = Counter()
    lengths: list[int] = []
    reject_lines: list[str] = []

    with open(tmp_bin, "wb") as out:
        batch: list[str] = []

        def flush() -> None:
            if not batch:
                return
            encoded = tok.encode_batch(batch)
            if append_eod:
                for ids in encoded:
                    ids.append(tok.eod)
            flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype)
            out.write(flat.tobytes(order="C"))
            lengths.extend(len(ids) for ids in encoded)
            batch.clear()

        for item in iter_unit(unit, text_keys):
            if isinstance(item, Reject):
                rejects[item.reason] += 1
                if write_rejects:
                    raw = item.raw.decode("utf-8", "replace") if item.raw is not None else None
                    reject_lines.append(
                        json.dumps({"reason": item.reason, "where": item.line, "raw": raw})
                    )
                continue
            batch.append(item.text)
            result.bytes_read += item.raw_bytes
            if len(batch) >= BATCH_DOCS:
                flush()
        flush()

    write_index(tmp_idx, dtype, np.asarray(lengths, dtype=np.int32), np.arange(len(lengths) + 1))
    result.documents = len(lengths)
    result.tokens = int(sum(lengths))
    result.rejects = dict(rejects)
    if reject_lines:
        Path(f"{prefix}.rejects.jsonl").write_text("\n".join(reject_lines) + "\n")
    os.replace(tmp_bin, f"{prefix}.bin")
    os.replace(tmp_idx, f"{prefix}.idx")
    done_tmp = Path(f"{prefix}.done.tmp")
    done_tmp.write_text(json.dumps(result.__dict__))
    os.replace(done_tmp, f"{prefix}.done")
    return result


# --------------------------------------------------------------------------- driver


def _plan_digest(units: list[WorkUnit], cfg: TokenizeConfig, tokenizer_id: str) -> dict[str, Any]:
    files = sorted({u.path for u in units})
    stats = {f: [os.path.getsize(f), int(os.path.getmtime(f))] for f in files}
    plan = {
        "units": [u.to_dict() for u in units],
        "files": stats,
        "text_keys": cfg.text_keys,
        "append_eod": cfg.append_eod,
        "tokenizer": tokenizer_id,
    }
    plan["digest"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()
    return plan


def _tokenizer_identity(tokenizer_dir: str) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = Path(tokenizer_dir) / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _probe_texts(units: list[WorkUnit], text_keys: Sequence[str], n: int = 64) -> list[str]:
    """The first documents of the corpus: the fast path must reproduce HF on real data."""
    from qmath_megatron.data.readers import Record

    texts: list[str] = []
    for unit in units[:4]:
        for item in iter_unit(unit, text_keys):
            if isinstance(item, Record):
                texts.append(item.text[:20000])
                if len(texts) >= n:
                    return texts
    return texts


class _Progress:
    def __init__(self, total_units: int, total_bytes: int, enabled: bool):
        self.start = time.time()
        self.enabled = enabled
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", file=sys.stderr,
                            dynamic_ncols=True)  # fmt: skip
        self.docs = self.tokens = 0

    def update(self, r: UnitResult, unit_bytes: int) -> None:
        self.docs += r.documents
        self.tokens += r.tokens
        if self.bar is not None:
            elapsed = max(time.time() - self.start, 1e-9)
            self.bar.set_postfix(
                docs_s=f"{self.docs / elapsed:,.0f}", tok_s=f"{self.tokens / elapsed:,.0f}"
            )
            self.bar.update(unit_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _unit_bytes(unit: WorkUnit) -> int:
    if unit.format == "jsonl":
        return max(unit.end - unit.start, 0)
    return os.path.getsize(unit.path) if unit.format != "parquet" else 0


def tokenize_corpus(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run (or resume) a tokenization job; returns the summary that is also printed."""
    start = time.time()
    if cfg.workers < 1:
        raise ValueError("--workers must be >= 1")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ValueError("--max-bad-fraction must be in [0, 1]")
    files = expand_inputs(cfg.inputs)
    units = plan_units(files, max(int(cfg.chunk_mb * 1024**2), 1))
    prefix = Path(cfg.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    work = Path(f"{prefix}.work")
    plan = _plan_digest(units, cfg, _tokenizer_identity(cfg.tokenizer))
    plan_file = work / "plan.json"
    if work.exists() and plan_file.is_file():
        old = json.loads(plan_file.read_text())
        if old.get("digest") != plan["digest"]:
            raise ValueError(
                f"{work} holds a partial run with different inputs/options; remove it to start over"
            )
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        plan_file.write_text(json.dumps(plan, indent=1))

    done = {u.index for u in units if Path(f"{_shard_prefix(work, u.index)}.done").is_file()}
    todo = [u for u in units if u.index not in done]
    if done:
        logger.info("resuming: %d of %d units already done", len(done), len(units))
    probe = _probe_texts(units, cfg.text_keys) if cfg.fast_path else []
    # The parent checks the tokenizer once, so a bad tokenizer fails before any worker starts.
    from qmath_megatron.data.fast_tokenizer import BatchTokenizer

    parent_tok = BatchTokenizer.from_dir(cfg.tokenizer, probe=probe, allow_fast=cfg.fast_path)
    progress = _Progress(len(units), sum(_unit_bytes(u) for u in todo), cfg.progress)
    jobs = [
        (u.to_dict(), str(work), cfg.text_keys, cfg.append_eod, cfg.rejects_file is not None)
        for u in todo
    ]
    if todo:
        if cfg.workers == 1:
            _STATE["tok"] = parent_tok
            for job, unit in zip(jobs, todo):
                progress.update(_process_unit(job), _unit_bytes(unit))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(cfg.workers, _init_worker, (parent_tok.spec,)) as pool:
                for unit, r in zip(todo, pool.imap(_process_unit, jobs, chunksize=1)):
                    progress.update(r, _unit_bytes(unit))
    progress.close()

    results = [UnitResult.load(Path(f"{_shard_prefix(work, u.index)}.done")) for u in units]
    rejects: Counter[str] = Counter()
    for r in results:
        rejects.update(r.rejects)
    documents = sum(r.documents for r in results)
    bad = sum(rejects.values())
    summary: dict[str, Any] = {
        "output_prefix": str(prefix),
        "documents": documents,
        "tokens": sum(r.tokens for r in results),
        "bytes": sum(r.bytes_read for r in results),
        "rejects": {reason: rejects.get(reason, 0) for reason in REJECT_REASONS},
        "rejected": bad,
        "units": len(units),
        "resumed_units": len(done),
        "workers": cfg.workers,
        "backend": parent_tok.backend,
        "dtype": np.dtype(optimal_dtype(parent_tok.vocab_size)).name,
    }
    if cfg.rejects_file:
        with open(cfg.rejects_file, "w", encoding="utf-8") as out:
            for u in units:
                path = Path(f"{_shard_prefix(work, u.index)}.rejects.jsonl")
                if path.is_file():
                    out.write(path.read_text())
    total = documents + bad
    if total and bad / total > cfg.max_bad_fraction:
        raise ValueError(
            f"{bad} of {total} records were rejected ({bad / total:.1%} > --max-bad-fraction "
            f"{cfg.max_bad_fraction:.1%}): {dict(rejects)}; partial shards kept in {work}"
        )

    dtype = optimal_dtype(parent_tok.vocab_size)
    if cfg.keep_shards:
        blend = []
        for u, r in zip(units, results):
            blend += [str(r.tokens), str(_shard_prefix(work, u.index))]
        Path(f"{prefix}.blend.txt").write_text(" ".join(blend) + "\n")
        summary["blend_file"] = f"{prefix}.blend.txt"
    else:
        tmp = Path(f"{prefix}.tmp")
        merge_datasets([_shard_prefix(work, u.index) for u in units], tmp, dtype)
        # .bin first: a reader opens through the .idx, which only appears when both exist.
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
        shutil.rmtree(work)
    summary["seconds"] = round(time.time() - start, 2)
    return summary

"""Tokenize corpora into one Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``).

Same bytes as the straightforward way (per-document ``tokenizer.encode`` + ``<|endoftext|>``
+ megatron-core's ``IndexedDatasetBuilder.add_document``), produced faster:

- inputs are cut into deterministic shards (:func:`qmath_megatron.data.shards.plan`: byte
  ranges of plain JSONL, whole compressed files, Parquet row groups);
- N worker processes tokenize whole batches of documents (tiktoken fast path verified
  against HF, :mod:`qmath_megatron.data.fast_tokenizer`) and write each shard's tokens with
  one ``write`` per batch into ``PREFIX.work/shards/<input path>[.part-N].bin/.idx``;
- shards are concatenated in input order (as ``IndexedDatasetBuilder.add_index``), so the
  output does not depend on N.

Resumable through :mod:`qmath_megatron.data.shards` (fingerprint of inputs, tokenizer and
options in ``PREFIX.work/.qmath``; a changed one is refused unless ``overwrite``). The final
``PREFIX.bin``/``.idx`` appear by rename only when complete, and an existing pair is never
replaced without ``overwrite``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qmath_megatron.data.fast_tokenizer import BatchTokenizer
from qmath_megatron.data.indexed import merge_datasets, write_index
from qmath_megatron.data.readers import REJECT_REASONS, Record, Reject
from qmath_megatron.data.shards import Shard, ShardJob, ShardOutput, discover, file_digest, plan

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
    overwrite: bool = False  # replace existing PREFIX.bin/.idx and a differing partial run
    allow_truncated: bool = False  # read a truncated .gz/.zst's readable part (+ a reject)

    def __post_init__(self) -> None:
        if not str(self.output_prefix).strip() or str(self.output_prefix).endswith(("/", os.sep)):
            raise ValueError(
                f"--output-prefix {self.output_prefix!r} must name files (PREFIX.bin, PREFIX.idx)"
            )
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not self.chunk_mb > 0:
            raise ValueError(f"--chunk-mb must be > 0, got {self.chunk_mb}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction must be in [0, 1], got {self.max_bad_fraction}")
        if not self.text_keys:
            raise ValueError("give at least one --text-key")
        if self.rejects_file:
            parent = Path(self.rejects_file).parent
            if not parent.is_dir():
                raise FileNotFoundError(
                    f"--rejects-file {self.rejects_file}: directory {parent} does not exist"
                )
            if not os.access(parent, os.W_OK):
                raise ValueError(f"--rejects-file {self.rejects_file}: {parent} is not writable")


# --------------------------------------------------------------------------- workers


def _init_state(spec, text_keys: list[str], append_eod: bool, allow_truncated: bool) -> dict:
    # Verified by the parent; rebuilt from the spec in ~0.1 s.
    return {
        "tok": BatchTokenizer(spec),
        "text_keys": text_keys,
        "append_eod": append_eod,
        "allow_truncated": allow_truncated,
    }


def _tokenize_shard(shard: Shard, out: ShardOutput, state: dict) -> dict:
    """One shard -> ``shards/<name>.bin/.idx`` (+ ``rejects/<name>``)."""
    tok = state["tok"]
    dtype = optimal_dtype(tok.vocab_size)
    rejects: Counter[str] = Counter()
    lengths: list[int] = []
    n_bytes = 0
    with open(out.path("shards", ".bin"), "wb") as f, out.open("rejects") as rej:
        batch: list[str] = []

        def flush() -> None:
            if not batch:
                return
            encoded = tok.encode_batch(batch)
            if state["append_eod"]:
                for ids in encoded:
                    ids.append(tok.eod)
            flat = np.fromiter((i for ids in encoded for i in ids), dtype=dtype)
            f.write(flat.tobytes(order="C"))
            lengths.extend(len(ids) for ids in encoded)
            batch.clear()

        for item in shard.records(
            state["text_keys"], allow_truncated=state["allow_truncated"], text_only=True
        ):
            if isinstance(item, Reject):
                rejects[item.reason] += 1
                rej.write(item.to_json() + "\n")
                continue
            batch.append(item.text)
            n_bytes += item.raw_bytes
            if len(batch) >= BATCH_DOCS:
                flush()
        flush()
    write_index(
        out.path("shards", ".idx"),
        dtype,
        np.asarray(lengths, dtype=np.int32),
        np.arange(len(lengths) + 1),
    )
    return {
        "documents": len(lengths),
        "tokens": int(sum(lengths)),
        "bytes_read": n_bytes,
        "rejects": dict(rejects),
    }


# --------------------------------------------------------------------------- driver


def _tokenizer_files(tokenizer_dir: str) -> dict[str, Any]:
    out = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = Path(tokenizer_dir) / name
        if p.is_file():
            out[name] = file_digest(p)
    return out


def _probe_texts(
    shards: list[Shard], text_keys: list[str], allow_truncated: bool, n: int = 64
) -> list[str]:
    """The first documents of the corpus: the fast path must reproduce HF on real data."""
    texts: list[str] = []
    for shard in shards[:4]:
        for item in shard.records(text_keys, allow_truncated=allow_truncated):
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

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                desc="tokenize",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.docs = self.tokens = 0

    def update(self, r: dict, unit_bytes: int) -> None:
        self.docs += r["documents"]
        self.tokens += r["tokens"]
        if self.bar is not None:
            elapsed = max(time.time() - self.start, 1e-9)
            self.bar.set_postfix(
                docs_s=f"{self.docs / elapsed:,.0f}", tok_s=f"{self.tokens / elapsed:,.0f}"
            )
            self.bar.update(unit_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tokenize_corpus(cfg: TokenizeConfig) -> dict[str, Any]:
    """Run (or resume) a tokenization job; returns the summary that is also printed."""
    start = time.time()
    prefix = Path(cfg.output_prefix)
    finals = (
        [Path(f"{prefix}.blend.txt")]
        if cfg.keep_shards
        else [Path(f"{prefix}.bin"), Path(f"{prefix}.idx")]
    )
    existing = [p for p in finals if p.exists()]
    if existing == finals[:1] and len(finals) == 2 and (Path(f"{prefix}.work") / ".qmath").is_dir():
        existing = []  # our .bin, published just before a kill stopped the .idx: finish it
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    shards = plan(discover(cfg.inputs), max(int(cfg.chunk_mb * 1024**2), 1))
    work = Path(f"{prefix}.work")
    if not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {cfg.tokenizer}")
    settings = {
        "text_keys": cfg.text_keys,
        "append_eod": cfg.append_eod,
        "tokenizer": _tokenizer_files(cfg.tokenizer),
        "chunk_bytes": int(cfg.chunk_mb * 1024**2),
        "allow_truncated": cfg.allow_truncated,
    }
    job = ShardJob("tokenize", work, ("shards", "rejects"), settings, overwrite=cfg.overwrite)
    run = job.open(shards, hash_threads=cfg.workers)
    probe = _probe_texts(shards, cfg.text_keys, cfg.allow_truncated) if cfg.fast_path else []
    # The parent checks the tokenizer once, so a bad tokenizer fails before any worker starts.
    parent_tok = BatchTokenizer.from_dir(cfg.tokenizer, probe=probe, allow_fast=cfg.fast_path)
    todo = [s for s in shards if not run.is_done("tokenize", s)]
    progress = _Progress(len(shards), sum(s.size() for s in todo), cfg.progress)
    try:
        results = run.map(
            "tokenize",
            _tokenize_shard,
            workers=cfg.workers,
            init=_init_state,
            init_args=(parent_tok.spec, cfg.text_keys, cfg.append_eod, cfg.allow_truncated),
            on_result=lambda s, r: progress.update(r, s.size()),
        )
    finally:
        progress.close()

    rejects: Counter[str] = Counter()
    for r in results:
        rejects.update(r["rejects"])
    documents = sum(r["documents"] for r in results)
    bad = sum(rejects.values())
    summary: dict[str, Any] = {
        "output_prefix": str(prefix),
        "documents": documents,
        "tokens": sum(r["tokens"] for r in results),
        "bytes": sum(r["bytes_read"] for r in results),
        "rejects": {reason: rejects.get(reason, 0) for reason in REJECT_REASONS},
        "rejected": bad,
        "units": len(shards),
        "resumed_units": run.resumed["tokenize"],
        "workers": cfg.workers,
        "backend": parent_tok.backend,
        "dtype": np.dtype(optimal_dtype(parent_tok.vocab_size)).name,
    }
    if cfg.rejects_file:
        # From every shard's rejects, also those done by an earlier (interrupted) run.
        tmp = Path(cfg.rejects_file).with_name(f".{Path(cfg.rejects_file).name}.tmp")
        with open(tmp, "wb") as out:
            for s in shards:
                with open(run.path("rejects", s), "rb") as src:
                    shutil.copyfileobj(src, out)
        os.replace(tmp, cfg.rejects_file)
    total = documents + bad
    if documents == 0:
        hint = ""
        if rejects.get("missing_text"):
            hint = f"; is --text-key right? (looked for {cfg.text_keys})"
        raise ValueError(
            f"no documents to write: all {bad} records were rejected {dict(rejects)}{hint}"
        )
    if total and bad / total > cfg.max_bad_fraction:
        raise ValueError(
            f"{bad} of {total} records were rejected ({bad / total:.1%} > --max-bad-fraction "
            f"{cfg.max_bad_fraction:.1%}): {dict(rejects)}; partial shards kept in {work}"
        )

    dtype = optimal_dtype(parent_tok.vocab_size)
    if cfg.keep_shards:
        blend = []
        for s, r in zip(shards, results):
            if r["tokens"]:  # an empty shard would get weight 0, which Megatron refuses
                blend += [str(r["tokens"]), str(run.path("shards", s))]
        tmp = Path(f"{prefix}.blend.txt.tmp")
        tmp.write_text(" ".join(blend) + "\n")
        os.replace(tmp, f"{prefix}.blend.txt")
        summary["blend_file"] = f"{prefix}.blend.txt"
    else:
        tmp = Path(f"{prefix}.tmp")
        merge_datasets([run.path("shards", s) for s in shards], tmp, dtype)
        # .bin first: a reader opens through the .idx, which only appears when both exist.
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
        shutil.rmtree(work)
    summary["seconds"] = round(time.time() - start, 2)
    return summary

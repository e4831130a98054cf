"""Per-shard workers for the LLM curation steps (module level, so they can be spawned).

Each worker process holds one engine. On GPU machines worker ``i`` is pinned to GPU
``i % n_gpus`` (``CUDA_VISIBLE_DEVICES`` is set before CUDA initialises in the fresh
process), so ``--workers`` = number of GPUs runs one engine per GPU over different shards.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import Counter
from pathlib import Path

_STATE: dict = {}


def init_worker(
    model: str, backend: str, text_key: str, id_key: str, batch_size: int, gpus: int
) -> None:
    identity = mp.current_process()._identity
    if gpus and identity:  # a pool worker: one GPU each
        os.environ["CUDA_VISIBLE_DEVICES"] = str((identity[0] - 1) % gpus)
    from qmath_megatron.inference.engine import make_engine

    _STATE.update(
        engine=make_engine(model, backend), text_key=text_key, id_key=id_key, batch_size=batch_size
    )


def score_shard(path: Path, tmp: Path) -> dict:
    from qmath_megatron.curation.llm_steps import score_texts
    from qmath_megatron.curation.records import read_records

    key, bs = _STATE["text_key"], _STATE["batch_size"]
    records, rejected = read_records([str(path)], key)
    hist, unparseable = Counter(), []
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(records), bs):
            chunk = records[start : start + bs]
            for r, res in zip(chunk, score_texts(_STATE["engine"], [x[key] for x in chunk])):
                hist[str(res.score)] += 1
                if res.score is None:
                    unparseable.append({"id": r.get(_STATE["id_key"]), "answer": res.raw[:200]})
                f.write(json.dumps({**r, "quality_score": res.score}, ensure_ascii=False) + "\n")
    print(f"scored {path}: {len(records):,} documents", flush=True)
    return {
        "scored": len(records),
        "histogram": dict(hist),
        "unparseable": unparseable,
        "rejected": dict(rejected),
    }


def synthesize_shard(path: Path, tmp: Path) -> dict:
    from qmath_megatron.curation.llm_steps import synthesize_texts
    from qmath_megatron.curation.records import read_records

    key, bs = _STATE["text_key"], _STATE["batch_size"]
    records, rejected = read_records([str(path)], key)
    pairs = empty = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, len(records), bs):
            chunk = records[start : start + bs]
            ids = [
                str(r.get(_STATE["id_key"], f"{path.name}:{start + i}"))
                for i, r in enumerate(chunk)
            ]
            qa, no_pairs = synthesize_texts(_STATE["engine"], [r[key] for r in chunk], ids)
            empty, pairs = empty + no_pairs, pairs + len(qa)
            for row in qa:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"synthesized {path}: {pairs:,} QA pairs from {len(records):,} documents", flush=True)
    return {
        "documents": len(records),
        "qa_pairs": pairs,
        "documents_without_pairs": empty,
        "rejected": dict(rejected),
    }

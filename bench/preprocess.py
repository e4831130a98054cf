"""Tokens/s of `qmath data tokenize` vs the straightforward reference, same workers, same run.

The reference is what Megatron-LM's tools/preprocess_data.py does: a pool of workers each
calling `tokenizer.encode(text)` per document (HF tokenizer), the main process appending
<|endoftext|> and writing every document with megatron-core's
`IndexedDatasetBuilder.add_document`. Both outputs must be byte-identical.

    python bench/preprocess.py [--mb 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from qmath_megatron.data.synthetic import generate_documents
from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus
from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
_TOK = {}


def write_corpus(path: Path, target_mb: float) -> int:
    """Generated math documents mixed with real benchmark prose (when ../shared exists)."""
    real = []
    for rel, keys in (
        ("math500/test.jsonl", ("problem", "solution")),
        ("gsm8k/test.jsonl", ("question", "answer")),
    ):
        p = SHARED / rel
        if p.is_file():
            real += ["\n\n".join(json.loads(line)[k] for k in keys) for line in p.open()]
    rng = random.Random(0)
    written, n = 0, 0
    with path.open("w", encoding="utf-8") as f:
        for doc in generate_documents(10**9, seed=0, problems_per_doc=6):
            if real and rng.random() < 0.5:
                doc["text"] = "\n\n".join(rng.sample(real, 3)) + "\n\n" + doc["text"]
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
            if written >= target_mb * 1e6:
                return n
    return n


def _ref_init(tok_dir: str) -> None:
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    _TOK["tok"] = load_tokenizer(tok_dir)


def _ref_encode(line: str) -> list[int]:
    text = json.loads(line)["text"]
    return _TOK["tok"].encode(text, add_special_tokens=False)


def reference(corpus: Path, tok_dir: Path, prefix: Path, workers: int) -> tuple[int, float]:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from qmath_megatron.tokenizer.qwen import load_tokenizer

    start = time.time()
    eod = load_tokenizer(tok_dir).eos_token_id
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    tokens = 0
    with (
        corpus.open(encoding="utf-8") as f,
        mp.get_context("spawn").Pool(workers, _ref_init, (str(tok_dir),)) as pool,
    ):
        for ids in pool.imap(_ref_encode, f, chunksize=32):
            ids.append(eod)
            builder.add_document(np.array(ids, dtype=np.int32), [len(ids)])
            tokens += len(ids)
    builder.finalize(f"{prefix}.idx")
    return tokens, time.time() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=60.0, help="corpus size in MB (>= 50 for the record)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/qmath-bench-preprocess")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok_dir = build_qwen25_tokenizer(work / "tok")
    corpus = work / "corpus.jsonl"
    docs = write_corpus(corpus, args.mb)
    mb = corpus.stat().st_size / 1e6
    print(f"corpus: {docs:,} documents, {mb:.1f} MB; workers: {args.workers}", flush=True)

    ref_tokens, ref_s = reference(corpus, tok_dir, work / "ref", args.workers)
    print(
        f"reference (per-document encode + IndexedDatasetBuilder): {ref_tokens:,} tokens "
        f"in {ref_s:.1f} s = {ref_tokens / ref_s:,.0f} tokens/s, {mb / ref_s:.2f} MB/s",
        flush=True,
    )
    summary = tokenize_corpus(
        TokenizeConfig(
            inputs=[str(corpus)],
            output_prefix=str(work / "ours"),
            tokenizer=str(tok_dir),
            workers=args.workers,
            progress=False,
        )
    )
    ours_s = summary["seconds"]
    print(
        f"qmath data tokenize ({summary['backend']}): {summary['tokens']:,} tokens "
        f"in {ours_s:.1f} s = {summary['tokens'] / ours_s:,.0f} tokens/s, "
        f"{mb / ours_s:.2f} MB/s",
        flush=True,
    )
    identical = all(
        (work / f"ref{ext}").read_bytes() == (work / f"ours{ext}").read_bytes()
        for ext in (".bin", ".idx")
    )
    ratio = (summary["tokens"] / ours_s) / (ref_tokens / ref_s)
    print(f"identical output: {identical}")
    print(f"speed-up (tokens/s, ours / reference, {args.workers} workers each): {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

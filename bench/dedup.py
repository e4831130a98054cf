"""docs/s and precision/recall of `qmath data dedup` vs datatrove's MinHash pipeline.

Same generated labelled corpus (near-duplicate variants: word edits, inserted sentences,
reordered paragraphs, changed numbers; plus true non-duplicates), same shards, same worker
count, same shingles (word 5-grams) and the same LSH banding for both, in one run.
datatrove is installed for the benchmark only:
`pip install datatrove "xxhash<4" orjson spacy` (xxhash 4 no longer hashes str, which
datatrove 0.10.1 passes).

    python bench/dedup.py [--bases 4000] [--shards 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from qmath_megatron.curation.dedup import DedupConfig, dedup
from qmath_megatron.curation.neardups import labelled_corpus, pairwise_precision_recall


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def run_ours(
    inputs: Path, out: Path, workers: int, bands: int, rows: int, position: dict[str, int]
):
    start = time.time()
    dedup(
        DedupConfig(
            inputs=[str(inputs / "*.jsonl")],
            output=str(out),
            workers=workers,
            bands=bands,
            rows=rows,
        )
    )
    seconds = time.time() - start
    clusters: dict[str, int] = {}
    for f in (out / "kept").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            clusters[r["id"]] = position[r["id"]]  # a kept document roots its cluster
    for f in (out / "removed").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            clusters[r["id"]] = r["dedup_cluster"]
    return seconds, clusters


def run_datatrove(
    inputs: Path, out: Path, workers: int, shards: int, bands: int, rows: int, norm_numbers: bool
):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import TextNormConfig

    # datatrove's default normalisation maps every digit to 0: on math text that makes
    # different problems identical, so it is measured both ways.
    config = MinhashConfig(
        n_grams=5,
        num_buckets=bands,
        hashes_per_bucket=rows,
        norm_config=TextNormConfig(norm_numbers=norm_numbers),
    )
    start = time.time()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(inputs)),
            MinhashDedupSignature(output_folder=str(out / "sigs"), config=config),
        ],
        tasks=shards,
        workers=workers,
        logging_dir=str(out / "logs1"),
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            MinhashDedupBuckets(
                input_folder=str(out / "sigs"), output_folder=str(out / "buckets"), config=config
            )
        ],
        tasks=bands,
        workers=workers,
        logging_dir=str(out / "logs2"),
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            MinhashDedupCluster(
                input_folder=str(out / "buckets"),
                output_folder=str(out / "remove_ids"),
                config=config,
                save_cluster_id=True,
            )
        ],
        tasks=1,
        logging_dir=str(out / "logs3"),
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            JsonlReader(str(inputs)),
            MinhashDedupFilter(
                input_folder=str(out / "remove_ids"),
                load_cluster_ids=True,
                exclusion_writer=JsonlWriter(str(out / "removed"), compression=None),
            ),
            JsonlWriter(str(out / "kept"), compression=None),
        ],
        tasks=shards,
        workers=workers,
        logging_dir=str(out / "logs4"),
    ).run()
    seconds = time.time() - start
    clusters: dict[str, object] = {}
    for kind in ("kept", "removed"):
        for f in (out / kind).glob("*.jsonl"):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                cid = r.get("metadata", {}).get("minhash_cluster_id")
                clusters[r["id"]] = ("c", cid) if cid is not None and cid != -1 else ("d", r["id"])
    return seconds, clusters


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bases", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/qmath-bench-dedup")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    records = labelled_corpus(args.bases, seed=0)
    per = -(-len(records) // args.shards)
    for i in range(args.shards):
        with (inputs / f"part-{i:03d}.jsonl").open("w") as f:
            for r in records[i * per : (i + 1) * per]:
                f.write(json.dumps(r) + "\n")
    bands, rows = DedupConfig(inputs=[], output="").band_rows()
    labels = [r["label"] for r in records]
    position = {r["id"]: i for i, r in enumerate(records)}  # global input order = shard order
    print(
        f"corpus: {len(records):,} documents ({args.bases} bases), {args.shards} shards, "
        f"{args.workers} workers, 5-gram shingles, {bands} bands x {rows} rows",
        flush=True,
    )
    results = {}
    runs = {
        "qmath data dedup": lambda: run_ours(
            inputs, work / "ours", args.workers, bands, rows, position
        ),
        "datatrove (numbers kept)": lambda: run_datatrove(
            inputs, work / "dt1", args.workers, args.shards, bands, rows, False
        ),
        "datatrove (default norm)": lambda: run_datatrove(
            inputs, work / "dt2", args.workers, args.shards, bands, rows, True
        ),
    }
    for name, fn in runs.items():
        seconds, clusters = fn()
        missing = [r["id"] for r in records if r["id"] not in clusters]
        if missing:
            raise RuntimeError(f"{name}: {len(missing)} documents missing from the outputs")
        p, r = pairwise_precision_recall(labels, [clusters[x["id"]] for x in records])
        rate = len(records) / seconds
        results[name] = rate
        print(
            f"{name:<26} {seconds:6.1f} s  {rate:8,.0f} docs/s  "
            f"{rate / args.workers:8,.0f} docs/s/core  "
            f"precision {p:.3f} recall {r:.3f} F1 {f1(p, r):.3f}",
            flush=True,
        )
    ratio = results["qmath data dedup"] / results["datatrove (numbers kept)"]
    print(
        f"speed ratio (ours / datatrove with the same normalisation, docs/s per core): {ratio:.2f}x"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

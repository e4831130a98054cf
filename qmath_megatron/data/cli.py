"""``qmath data {tokenize, inspect}``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any


def _default(cls: type, name: str) -> Any:
    """A config dataclass field's default: the one place CLI defaults come from."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _add_common(p: argparse.ArgumentParser, cls: type, *, text_key: bool = True) -> None:
    """Flags every sharded data tool has."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo from scratch when the output holds a run with other inputs/settings (or exists)",
    )
    p.add_argument(
        "--allow-truncated",
        action="store_true",
        help="read the readable part of a truncated .gz/.zst (+ one truncated_input reject) instead of failing",
    )
    if "workers" in {f.name for f in dataclasses.fields(cls)}:
        p.add_argument(
            "--workers", type=int, default=_default(cls, "workers"), help="worker processes"
        )
    if text_key:
        p.add_argument(
            "--text-key", default=_default(cls, "text_key"), help="field holding the text"
        )


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.data.tokenize import TokenizeConfig as C

    p.add_argument(
        "--input",
        required=True,
        action="append",
        help="input file or glob (.jsonl, .jsonl.gz, .jsonl.zst, .parquet); repeatable",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True, help="local HF tokenizer directory")
    _add_common(p, C, text_key=False)
    p.add_argument(
        "--text-key",
        action="append",
        default=None,
        help=f"field holding the text (repeatable: the first present key is used; default {' '.join(_default(C, 'text_keys'))})",
    )
    p.add_argument(
        "--chunk-mb",
        type=float,
        default=_default(C, "chunk_mb"),
        help="plain JSONL is split into chunks of this size",
    )
    p.add_argument(
        "--no-eod", action="store_true", help="do not append <|endoftext|> to each document"
    )
    p.add_argument(
        "--keep-shards",
        action="store_true",
        help="keep per-shard datasets and write PREFIX.blend.txt instead of merging",
    )
    p.add_argument(
        "--rejects-file", default=None, help="write rejected records (with reasons) here"
    )
    p.add_argument(
        "--max-bad-fraction",
        type=float,
        default=_default(C, "max_bad_fraction"),
        help="fail if more than this fraction of records is rejected (default 1.0: never)",
    )
    p.add_argument("--no-fast-path", action="store_true", help="always use the HF tokenizer")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_tokenize(args: argparse.Namespace) -> int:
    from qmath_megatron.data.tokenize import TokenizeConfig, tokenize_corpus

    cfg = TokenizeConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        workers=args.workers,
        text_keys=args.text_key or _default(TokenizeConfig, "text_keys"),
        chunk_mb=args.chunk_mb,
        append_eod=not args.no_eod,
        keep_shards=args.keep_shards,
        rejects_file=args.rejects_file,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress and sys.stderr.isatty(),
        fast_path=not args.no_fast_path,
        overwrite=args.overwrite,
        allow_truncated=args.allow_truncated,
    )
    summary = tokenize_corpus(cfg)
    if args.json:
        print(json.dumps(summary))
        return 0
    secs = max(summary["seconds"], 1e-9)
    print(
        f"wrote {summary['output_prefix']}.bin/.idx ({summary['dtype']}, tokenizer backend "
        f"{summary['backend']}, {summary['workers']} workers)"
    )
    print(
        f"  documents {summary['documents']:,}  tokens {summary['tokens']:,}  bytes {summary['bytes']:,}"
    )
    print(
        f"  {secs:.1f} s: {summary['documents'] / secs:,.0f} docs/s, {summary['tokens'] / secs:,.0f} tokens/s, "
        f"{summary['bytes'] / secs / 1e6:.1f} MB/s"
    )
    rejects = {k: v for k, v in summary["rejects"].items() if v}
    print(f"  rejected {summary['rejected']:,}" + (f": {rejects}" if rejects else ""))
    if summary["resumed_units"]:
        print(
            f"  resumed: {summary['resumed_units']} of {summary['units']} units were already done"
        )
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from qmath_megatron.data.indexed import validate_indexed_dataset

    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    validate_indexed_dataset(prefix, deep=True)  # one clear line for missing/corrupt files
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    lengths = ds.sequence_lengths
    print(
        f"{prefix}: {len(ds.document_indices) - 1:,} documents, {len(ds):,} sequences, "
        f"{int(lengths.sum()):,} tokens, dtype {ds.index.dtype.__name__}"
    )
    if len(lengths):
        print(
            f"  sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}"
        )
    if args.doc is not None:
        if not 0 <= args.doc < len(ds):
            raise ValueError(f"--doc {args.doc} out of range (0..{len(ds) - 1})")
        ids = np.asarray(ds[args.doc]).tolist()
        print(f"document {args.doc}: {len(ids)} tokens")
        if args.tokenizer:
            from qmath_megatron.tokenizer.qwen import load_tokenizer

            print(load_tokenizer(args.tokenizer).decode(ids))
        else:
            print(ids)
    return 0


def run_decontaminate(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.run_decontaminate import DecontamConfig, decontaminate

    report = decontaminate(
        DecontamConfig(
            inputs=args.input,
            output=args.output,
            benchmarks=args.benchmark,
            text_key=args.text_key,
            workers=args.workers,
            lcs_threshold=args.lcs_threshold,
            lcs_max_words=args.lcs_max_words,
            overwrite=args.overwrite,
            allow_truncated=args.allow_truncated,
        )
    )
    print(
        f"kept {report['kept']:,}, removed {report['removed']:,} {report['removed_by_rule']}, "
        f"rejected {sum(report['rejected'].values()):,} {report['rejected'] or ''} -> {args.output}/report.json"
    )
    for m in report["matched_items"][:20]:
        print(
            f"  {m['benchmark']} item {m['item']} ({m['rule']}): {m['records_removed']} record(s)"
        )
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.dedup import DedupConfig, dedup

    report = dedup(
        DedupConfig(
            inputs=args.input,
            output=args.output,
            text_key=args.text_key,
            threshold=args.threshold,
            num_perm=args.num_perm,
            ngram=args.ngram,
            bands=args.bands,
            rows=args.rows,
            workers=args.workers,
            partitions=args.partitions,
            normalize=args.normalize,
            overwrite=args.overwrite,
            allow_truncated=args.allow_truncated,
        )
    )
    print(
        f"{report['documents']:,} documents: kept {report['kept']:,}, removed {report['removed']:,} in "
        f"{report['clusters']:,} duplicate clusters, rejected {report['bad_lines']:,} "
        f"({report['bands']} bands x {report['rows']} rows, {report['seconds']} s) -> {args.output}/report.json"
    )
    return 0


def _fasttext_config(args: argparse.Namespace):
    from qmath_megatron.curation.classify import FastTextConfig

    return FastTextConfig(
        dim=args.dim,
        lr=args.lr,
        word_ngrams=args.word_ngrams,
        min_count=args.min_count,
        epoch=args.epoch,
        threads=args.threads,
        bucket=args.bucket,
    )


def run_classify(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.classify import ClassifyConfig, classify

    report = classify(
        ClassifyConfig(
            inputs=args.input,
            output=args.output,
            positive=args.positive,
            negative=args.negative,
            model=args.model,
            threshold=args.threshold,
            top_fraction=args.top_fraction,
            text_key=args.text_key,
            fasttext=_fasttext_config(args),
            overwrite=args.overwrite,
            allow_truncated=args.allow_truncated,
        )
    )
    print(
        f"scored {report['scored']:,}, kept {report['kept']:,}, rejected {report['rejected'] or 0} -> {args.output}"
    )
    return 0


def run_recall(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.classify import RecallConfig, recall

    recall(
        RecallConfig(
            positive=args.positive,
            negative=args.negative,
            pool=args.pool,
            output=args.output,
            rounds=args.rounds,
            threshold=args.threshold,
            domain_ratio=args.domain_ratio,
            text_key=args.text_key,
            fasttext=_fasttext_config(args),
            overwrite=args.overwrite,
            allow_truncated=args.allow_truncated,
        )
    )
    return 0


def _llm_config(args: argparse.Namespace):
    from qmath_megatron.curation.llm_runner import LLMStepConfig

    return LLMStepConfig(
        inputs=args.input,
        output=args.output,
        model=args.model,
        engine=args.engine,
        batch_size=args.batch_size,
        workers=args.workers,
        text_key=args.text_key,
        id_key=args.id_key,
        overwrite=args.overwrite,
        allow_truncated=args.allow_truncated,
    )


def run_score(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.llm_runner import score

    report = score(_llm_config(args))
    print(
        f"scores {report['histogram']}; unparseable {report['unparseable']} (kept with quality_score null); "
        f"rejected {report['rejected'] or 0} -> {args.output}"
    )
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.llm_runner import synthesize

    report = synthesize(_llm_config(args))
    print(
        f"{report['qa_pairs']:,} QA pairs from {report['documents']:,} documents "
        f"({report['documents_without_pairs']:,} without pairs, in no_pairs/); rejected "
        f"{report['rejected'] or 0} -> {args.output}/qa/"
    )
    return 0


def _add_fasttext_args(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.classify import FastTextConfig as F

    for flag, kind, help_ in (
        ("dim", int, None),
        ("lr", float, None),
        ("word-ngrams", int, None),
        ("min-count", int, None),
        ("epoch", int, None),
        ("threads", int, None),
        ("bucket", int, "n-gram hash buckets"),
    ):
        p.add_argument(
            f"--{flag}", type=kind, default=_default(F, flag.replace("-", "_")), help=help_
        )


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="data preparation: tokenize, inspect")
    sub = data.add_subparsers(dest="data_command", metavar="STEP", required=True)
    t = sub.add_parser("tokenize", help="JSONL/Parquet -> Megatron indexed dataset (.bin/.idx)")
    add_tokenize_arguments(t)
    t.set_defaults(func=run_tokenize)
    from qmath_megatron.curation.classify import ClassifyConfig, RecallConfig
    from qmath_megatron.curation.dedup import DedupConfig
    from qmath_megatron.curation.llm_runner import LLMStepConfig
    from qmath_megatron.curation.run_decontaminate import DecontamConfig

    d = sub.add_parser("decontaminate", help="remove training records that match benchmark items")
    d.add_argument(
        "--input", required=True, action="append", help="JSONL(.gz/.zst)/Parquet file or glob"
    )
    d.add_argument(
        "--output",
        required=True,
        help="writes DIR/kept, DIR/removed, DIR/rejects (one file per input), DIR/report.json",
    )
    d.add_argument(
        "--benchmark",
        required=True,
        action="append",
        metavar="FILE:FIELD",
        help="benchmark JSONL and its text field, e.g. math500/test.jsonl:problem (repeatable)",
    )
    _add_common(d, DecontamConfig)
    d.add_argument("--lcs-threshold", type=float, default=_default(DecontamConfig, "lcs_threshold"))
    d.add_argument(
        "--lcs-max-words",
        type=int,
        default=_default(DecontamConfig, "lcs_max_words"),
        help="records up to this length get the LCS check",
    )
    d.set_defaults(func=run_decontaminate)
    u = sub.add_parser("dedup", help="MinHash + LSH near-duplicate removal")
    u.add_argument(
        "--input", required=True, action="append", help="JSONL(.gz/.zst)/Parquet file or glob"
    )
    u.add_argument(
        "--output",
        required=True,
        help="writes DIR/kept, DIR/removed, DIR/rejects (one file per input), DIR/report.json",
    )
    _add_common(u, DedupConfig)
    u.add_argument(
        "--threshold",
        type=float,
        default=_default(DedupConfig, "threshold"),
        help="Jaccard threshold for the LSH optimum",
    )
    u.add_argument("--num-perm", type=int, default=_default(DedupConfig, "num_perm"))
    u.add_argument(
        "--ngram", type=int, default=_default(DedupConfig, "ngram"), help="word n-gram shingle size"
    )
    u.add_argument("--bands", type=int, default=_default(DedupConfig, "bands"))
    u.add_argument("--rows", type=int, default=_default(DedupConfig, "rows"))
    u.add_argument(
        "--partitions",
        type=int,
        default=_default(DedupConfig, "partitions"),
        help="on-disk bucket partitions",
    )
    u.add_argument(
        "--normalize",
        default=_default(DedupConfig, "normalize"),
        choices=["words", "none"],
        help="words: NFKC, lower case, letters/digits only; none: split raw text on whitespace",
    )
    u.set_defaults(func=run_dedup)
    c = sub.add_parser("classify", help="fastText math classifier: train (or load) and score")
    c.add_argument("--input", required=True, action="append", help="documents to score")
    c.add_argument(
        "--output",
        required=True,
        help="writes DIR/scored, DIR/kept, DIR/dropped (math_score added), DIR/rejects, DIR/report.json",
    )
    c.add_argument("--positive", action="append", help="math seed documents (train)")
    c.add_argument("--negative", action="append", help="general documents (train)")
    c.add_argument("--model", default=None, help="use this trained model instead of training")
    sel = c.add_mutually_exclusive_group(required=True)
    sel.add_argument(
        "--threshold",
        type=float,
        default=_default(ClassifyConfig, "threshold"),
        help="keep P(math) >= T",
    )
    sel.add_argument(
        "--top-fraction",
        type=float,
        default=_default(ClassifyConfig, "top_fraction"),
        help="keep the top F of documents",
    )
    _add_common(c, ClassifyConfig)
    _add_fasttext_args(c)
    c.set_defaults(func=run_classify)
    r = sub.add_parser("recall", help="iterative fastText recall with domain expansion")
    r.add_argument("--positive", required=True, action="append")
    r.add_argument("--negative", required=True, action="append")
    r.add_argument(
        "--pool", required=True, action="append", help="candidate pages (with url fields)"
    )
    r.add_argument("--output", required=True)
    r.add_argument("--rounds", type=int, default=_default(RecallConfig, "rounds"))
    r.add_argument("--threshold", type=float, default=_default(RecallConfig, "threshold"))
    r.add_argument("--domain-ratio", type=float, default=_default(RecallConfig, "domain_ratio"))
    _add_common(r, RecallConfig)
    _add_fasttext_args(r)
    r.set_defaults(func=run_recall)
    for name, fn, help_ in (
        ("score", run_score, "quality score 0-5 by an instruct LLM"),
        ("synthesize", run_synthesize, "MAmmoTH2-style QA extraction + refinement"),
    ):
        g = sub.add_parser(name, help=help_)
        g.add_argument("--input", required=True, action="append")
        g.add_argument("--output", required=True)
        g.add_argument("--model", required=True, help="local HF model directory (instruct model)")
        g.add_argument(
            "--engine",
            default=_default(LLMStepConfig, "engine"),
            choices=["auto", "vllm", "transformers"],
        )
        g.add_argument("--batch-size", type=int, default=_default(LLMStepConfig, "batch_size"))
        _add_common(g, LLMStepConfig)
        g.add_argument("--id-key", default=_default(LLMStepConfig, "id_key"))
        g.set_defaults(func=fn)
    from qmath_megatron.sft import data as sft  # post-training data steps
    from qmath_megatron.sft import rft

    sft.add_cli(sub)
    rft.add_cli(sub)
    from qmath_megatron.rl import prompts as rl_prompts  # GRPO query filter

    rl_prompts.add_cli(sub)
    from qmath_megatron.reward_model import data as rm_data  # reward-model groups

    rm_data.add_cli(sub)
    i = sub.add_parser("inspect", help="counts of an indexed dataset; decode document N")
    i.add_argument("prefix", help="PREFIX of PREFIX.bin/PREFIX.idx")
    i.add_argument("--doc", type=int, default=None, help="document to print")
    i.add_argument("--tokenizer", default=None, help="decode with this tokenizer directory")
    i.set_defaults(func=run_inspect)

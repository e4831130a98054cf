"""``qmath data {decontaminate, dedup, classify, recall, score, synthesize}``: the curation
steps, added to the ``qmath data`` group by :func:`register_data`. Each step's flags come
from its config dataclass (:mod:`qmath_megatron.config.cli`).
"""

from __future__ import annotations

import argparse
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config
from qmath_megatron.curation.classify import ClassifyConfig, RecallConfig, classify, recall
from qmath_megatron.curation.dedup import DedupConfig, dedup
from qmath_megatron.curation.llm_runner import LLMStepConfig, score, synthesize
from qmath_megatron.curation.run_decontaminate import DecontamConfig, decontaminate
from qmath_megatron.data.cli import add_common

_OUTPUT_DIRS = "writes DIR/kept, DIR/removed, DIR/rejects (one file per input), DIR/report.json"


def run_decontaminate(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    report = decontaminate(cfg)
    print(
        f"kept {report['kept']:,}, removed {report['removed']:,} {report['removed_by_rule']}, "
        f"rejected {sum(report['rejected'].values()):,} {report['rejected'] or ''} -> {cfg.output}/report.json"
    )
    for m in report["matched_items"][:20]:
        print(
            f"  {m['benchmark']} item {m['item']} ({m['rule']}): {m['records_removed']} record(s)"
        )
    return 0


def run_dedup(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    report = dedup(cfg)
    print(
        f"{report['documents']:,} documents: kept {report['kept']:,}, removed {report['removed']:,} in "
        f"{report['clusters']:,} duplicate clusters, rejected {report['bad_lines']:,} "
        f"({report['bands']} bands x {report['rows']} rows, {report['seconds']} s) -> {cfg.output}/report.json"
    )
    return 0


def run_classify(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    report = classify(cfg)
    print(
        f"scored {report['scored']:,}, kept {report['kept']:,}, rejected {report['rejected'] or 0} -> {cfg.output}"
    )
    return 0


def run_recall(args: argparse.Namespace) -> int:
    recall(build_config(args))
    return 0


def run_score(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    report = score(cfg)
    print(
        f"scores {report['histogram']}; unparseable {report['unparseable']} (kept with quality_score null); "
        f"rejected {report['rejected'] or 0} -> {cfg.output}"
    )
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    report = synthesize(cfg)
    print(
        f"{report['qa_pairs']:,} QA pairs from {report['documents']:,} documents "
        f"({report['documents_without_pairs']:,} without pairs, in no_pairs/); rejected "
        f"{report['rejected'] or 0} -> {cfg.output}/qa/"
    )
    return 0


def _add_fasttext(a: ConfigArgs) -> None:
    """The flags of the ``fasttext`` section (a ``FastTextConfig``)."""
    for name in ("dim", "lr", "word_ngrams", "min_count", "epoch", "threads"):
        a.add(f"fasttext.{name}")
    a.add("fasttext.bucket", help="n-gram hash buckets")


def register_data(sub: Any) -> None:
    """Add the curation steps to the ``qmath data`` subparsers."""
    d = sub.add_parser("decontaminate", help="remove training records that match benchmark items")
    a = ConfigArgs(d, DecontamConfig)
    a.add(
        "inputs",
        "--input",
        required=True,
        action="append",
        help="JSONL(.gz/.zst)/Parquet file or glob",
    )
    a.add("output", required=True, help=_OUTPUT_DIRS)
    a.add(
        "benchmarks",
        "--benchmark",
        required=True,
        action="append",
        metavar="FILE:FIELD",
        help="benchmark JSONL and its text field, e.g. math500/test.jsonl:problem (repeatable)",
    )
    add_common(a)
    a.add("lcs_threshold")
    a.add("lcs_max_words", help="records up to this length get the LCS check")
    a.finish()
    d.set_defaults(func=run_decontaminate)

    u = sub.add_parser("dedup", help="MinHash + LSH near-duplicate removal")
    a = ConfigArgs(u, DedupConfig)
    a.add(
        "inputs",
        "--input",
        required=True,
        action="append",
        help="JSONL(.gz/.zst)/Parquet file or glob",
    )
    a.add("output", required=True, help=_OUTPUT_DIRS)
    add_common(a)
    a.add("threshold", help="Jaccard threshold for the LSH optimum")
    a.add("num_perm")
    a.add("ngram", help="word n-gram shingle size")
    a.add("bands")
    a.add("rows")
    a.add("partitions", help="on-disk bucket partitions")
    a.add(
        "normalize",
        choices=["words", "none"],
        help="words: NFKC, lower case, letters/digits only; none: split raw text on whitespace",
    )
    a.finish()
    u.set_defaults(func=run_dedup)

    c = sub.add_parser("classify", help="fastText math classifier: train (or load) and score")
    a = ConfigArgs(c, ClassifyConfig)
    a.add("inputs", "--input", required=True, action="append", help="documents to score")
    a.add(
        "output",
        required=True,
        help="writes DIR/scored, DIR/kept, DIR/dropped (math_score added), DIR/rejects, DIR/report.json",
    )
    a.add("positive", action="append", help="math seed documents (train)")
    a.add("negative", action="append", help="general documents (train)")
    a.add("model", help="use this trained model instead of training")
    sel = c.add_mutually_exclusive_group(required=True)
    a.add("threshold", container=sel, help="keep P(math) >= T")
    a.add("top_fraction", container=sel, help="keep the top F of documents")
    add_common(a)
    _add_fasttext(a)
    a.finish()
    c.set_defaults(func=run_classify)

    r = sub.add_parser("recall", help="iterative fastText recall with domain expansion")
    a = ConfigArgs(r, RecallConfig)
    a.add("positive", required=True, action="append")
    a.add("negative", required=True, action="append")
    a.add("pool", required=True, action="append", help="candidate pages (with url fields)")
    a.add("output", required=True)
    a.add("rounds")
    a.add("threshold")
    a.add("domain_ratio")
    add_common(a)
    _add_fasttext(a)
    a.finish()
    r.set_defaults(func=run_recall)

    for name, fn, help_ in (
        ("score", run_score, "quality score 0-5 by an instruct LLM"),
        ("synthesize", run_synthesize, "MAmmoTH2-style QA extraction + refinement"),
    ):
        g = sub.add_parser(name, help=help_)
        a = ConfigArgs(g, LLMStepConfig)
        a.add("inputs", "--input", required=True, action="append")
        a.add("output", required=True)
        a.add("model", required=True, help="local HF model directory (instruct model)")
        a.add("engine", choices=["auto", "vllm", "transformers"])
        a.add("batch_size")
        add_common(a)
        a.add("id_key")
        a.finish()
        g.set_defaults(func=fn)

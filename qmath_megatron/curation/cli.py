"""``qmath data {decontaminate, dedup, classify, recall, score, synthesize}``: the curation
steps, added to the ``qmath data`` group by :func:`register_data`.

Each step's flags come from its config dataclass (:mod:`qmath_megatron.config.cli`), added
when the step is used; the curation modules (which hold the config dataclasses) are
imported inside the functions that build a step's flags and run it, so that ``qmath --help``
and the other commands do not import them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later
from qmath_megatron.data.cli import add_common
from qmath_megatron.utils.run_summary import count, format_run_summary, print_run_summary

_OUTPUT_DIRS = "writes DIR/kept, DIR/removed, DIR/rejects (one file per input), DIR/report.json"


def run_decontaminate(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.run_decontaminate import decontaminate

    cfg = build_config(args)
    report = decontaminate(cfg)
    print(
        f"kept {report['kept']:,}, removed {report['removed']:,} {report['removed_by_rule']}, "
        f"rejected {sum(report['rejected'].values()):,} {report['rejected'] or ''} "
        f"-> {cfg.output}/report.json"
    )
    for m in report["matched_items"][:20]:
        print(
            f"  {m['benchmark']} item {m['item']} ({m['rule']}): {m['records_removed']} record(s)"
        )
    out = cfg.output.rstrip("/")
    print_run_summary(
        format_run_summary(
            "done: data decontaminate",
            _dirs(out, "kept", "removed", "rejects" if count(report["rejected"]) else None),
            {
                "kept": report["kept"],
                "removed": f"{report['removed']:,} (matching "
                f"{len(report['matched_items']):,} benchmark items)",
                "rejected": count(report["rejected"]),
            },
            [  # a pretraining corpus is tokenized, SFT conversations packed (docs/pipeline.md)
                _cmd("data", "tokenize", "--input", f"{out}/kept/*")
                + " --output-prefix data/math --tokenizer TOK/",
                _cmd("data", "sft-prepare", "--input", f"{out}/kept/*")
                + " --output-prefix data/sft --tokenizer TOK/",
            ],
        )
    )
    return 0


def _cmd(*words: str) -> str:
    return shlex.join(["qmath", *words])


def _dirs(out: str, *names: str | None) -> dict[str, str | None]:
    """The step's output directories (``None``: left out) and its report."""
    dirs = ", ".join(f"{out}/{name}/" for name in names if name)
    return {"outputs": dirs, "report": f"{out}/report.json"}


def run_dedup(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.dedup import dedup

    cfg = build_config(args)
    report = dedup(cfg)
    print(
        f"{report['documents']:,} documents: kept {report['kept']:,}, "
        f"removed {report['removed']:,} in "
        f"{report['clusters']:,} duplicate clusters, rejected {report['bad_lines']:,} "
        f"({report['bands']} bands x {report['rows']} rows, {report['seconds']} s) "
        f"-> {cfg.output}/report.json"
    )
    out = cfg.output.rstrip("/")
    print_run_summary(
        format_run_summary(
            "done: data dedup",
            _dirs(out, "kept", "removed", "rejects" if report["bad_lines"] else None),
            {
                "documents": report["documents"],
                "kept": report["kept"],
                "removed": f"{report['removed']:,} (in {report['clusters']:,} duplicate clusters)",
                "rejected": report["bad_lines"],
            },
            _cmd("data", "score", "--input", f"{out}/kept/*", "--output", "scored/")
            + " --model INSTRUCT_MODEL/",
        )
    )
    return 0


def run_classify(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.classify import classify

    cfg = build_config(args)
    report = classify(cfg)
    print(
        f"scored {report['scored']:,}, kept {report['kept']:,}, "
        f"rejected {report['rejected'] or 0} -> {cfg.output}"
    )
    out = cfg.output.rstrip("/")
    print_run_summary(
        format_run_summary(
            "done: data classify",
            _dirs(
                out, "kept", "dropped", "scored", "rejects" if count(report["rejected"]) else None
            ),
            {
                "scored": report["scored"],
                "kept": report["kept"],
                "dropped": report["scored"] - report["kept"],
                "rejected": count(report["rejected"]),
            },
            _cmd("data", "dedup", "--input", f"{out}/kept/*", "--output", "dedup/"),
        )
    )
    return 0


def run_recall(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.classify import recall

    cfg = build_config(args)
    rounds = recall(cfg)
    out = cfg.output.rstrip("/")
    last = rounds[-1] if rounds else {"round": 0, "selected": 0, "pool": 0, "math_domains": []}
    k = last["round"]
    report = Path(out) / "report.json"
    rejected = json.loads(report.read_text()).get("rejected", 0) if report.is_file() else 0
    print_run_summary(
        format_run_summary(
            f"done: data recall, {len(rounds)} round(s)",
            {
                "outputs": f"{out}/round_{k}/selected/, {out}/round_{k}/dropped/"
                + (f", {out}/rejects/" if count(rejected) else ""),
                "report": str(report),
            },
            {
                "pool": last.get("pool", 0),
                "selected": last["selected"],
                "math domains": len(last["math_domains"]),
                "rejected": count(rejected),
            },
            _cmd("data", "dedup", "--input", f"{out}/round_{k}/selected/*", "--output", "dedup/"),
        )
    )
    return 0


def run_score(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.llm_runner import score

    cfg = build_config(args)
    report = score(cfg)
    print(
        f"scores {report['histogram']}; unparseable {report['unparseable']} "
        "(kept with quality_score null); "
        f"rejected {report['rejected'] or 0} -> {cfg.output}"
    )
    out = cfg.output.rstrip("/")
    hist = report["histogram"]
    scored = sum(int(v) for v in hist.values()) if isinstance(hist, dict) else None
    print_run_summary(
        format_run_summary(
            "done: data score",
            _dirs(out, "scored", "rejects" if count(report["rejected"]) else None),
            {
                "scored": scored,
                "scores": str(hist),
                "unparseable": report["unparseable"],
                "rejected": count(report["rejected"]),
            },
            _cmd("data", "synthesize", "--input", f"{out}/scored/*", "--output", "qa/")
            + " --model INSTRUCT_MODEL/",
        )
    )
    return 0


def run_synthesize(args: argparse.Namespace) -> int:
    from qmath_megatron.curation.llm_runner import synthesize

    cfg = build_config(args)
    report = synthesize(cfg)
    print(
        f"{report['qa_pairs']:,} QA pairs from {report['documents']:,} documents "
        f"({report['documents_without_pairs']:,} without pairs, in no_pairs/); rejected "
        f"{report['rejected'] or 0} -> {cfg.output}/qa/"
    )
    out = cfg.output.rstrip("/")
    print_run_summary(
        format_run_summary(
            "done: data synthesize",
            _dirs(out, "qa", "no_pairs", "rejects" if count(report["rejected"]) else None),
            {
                "documents": report["documents"],
                "QA pairs": report["qa_pairs"],
                "no pairs": report["documents_without_pairs"],
                "rejected": count(report["rejected"]),
            },
            _cmd("data", "decontaminate", "--input", f"{out}/qa/*", "--output", "clean/")
            + " --benchmark BENCHMARK.jsonl:problem",
        )
    )
    return 0


def _add_fasttext(a: ConfigArgs) -> None:
    """The flags of the ``fasttext`` section (a ``FastTextConfig``)."""
    for name in ("dim", "lr", "word_ngrams", "min_count", "epoch", "threads"):
        a.add(f"fasttext.{name}")
    a.add("fasttext.bucket", help="n-gram hash buckets")


def _decontaminate_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.run_decontaminate import DecontamConfig

    a = ConfigArgs(p, DecontamConfig)
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


def _dedup_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.dedup import DedupConfig

    a = ConfigArgs(p, DedupConfig)
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


def _classify_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.classify import ClassifyConfig

    a = ConfigArgs(p, ClassifyConfig)
    a.add("inputs", "--input", required=True, action="append", help="documents to score")
    a.add(
        "output",
        required=True,
        help="writes DIR/scored, DIR/kept, DIR/dropped (math_score added), DIR/rejects, "
        "DIR/report.json",
    )
    a.add("positive", action="append", help="math seed documents (train)")
    a.add("negative", action="append", help="general documents (train)")
    a.add("model", help="use this trained model instead of training")
    sel = p.add_mutually_exclusive_group(required=True)
    a.add("threshold", container=sel, help="keep P(math) >= T")
    a.add("top_fraction", container=sel, help="keep the top F of documents")
    add_common(a)
    _add_fasttext(a)
    a.finish()


def _recall_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.classify import RecallConfig

    a = ConfigArgs(p, RecallConfig)
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


def _llm_step_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.curation.llm_runner import LLMStepConfig

    a = ConfigArgs(p, LLMStepConfig)
    a.add("inputs", "--input", required=True, action="append")
    a.add("output", required=True)
    a.add("model", required=True, help="local HF model directory (instruct model)")
    a.add("engine", choices=["auto", "vllm", "transformers"])
    a.add("batch_size")
    add_common(a)
    a.add("id_key")
    a.finish()


def register_data(sub: Any) -> None:
    """Add the curation steps to the ``qmath data`` subparsers."""
    for name, help_, flags, run in (
        (
            "decontaminate",
            "remove training records that match benchmark items",
            _decontaminate_flags,
            run_decontaminate,
        ),
        ("dedup", "MinHash + LSH near-duplicate removal", _dedup_flags, run_dedup),
        (
            "classify",
            "fastText math classifier: train (or load) and score",
            _classify_flags,
            run_classify,
        ),
        ("recall", "iterative fastText recall with domain expansion", _recall_flags, run_recall),
        ("score", "quality score 0-5 by an instruct LLM", _llm_step_flags, run_score),
        (
            "synthesize",
            "MAmmoTH2-style QA extraction + refinement",
            _llm_step_flags,
            run_synthesize,
        ),
    ):
        p = sub.add_parser(name, help=help_)
        build_later(p, flags)
        p.set_defaults(func=run)

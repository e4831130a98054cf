"""``qmath data {tokenize, ..., inspect}``: the data group and its own steps.

The curation steps (:mod:`qmath_megatron.curation.cli`) and the training stages' data steps
(``sft/cli.py``, ``rl/cli.py``, ``reward_model/cli.py``) register themselves through the
``steps`` that :mod:`qmath_megatron.cli` passes to :func:`register`. Each step's flags come
from its config dataclass (:mod:`qmath_megatron.config.cli`), added when the step is used.
The implementation modules (which hold the config dataclasses) are imported inside the
functions that build a step's flags and run it, so that ``qmath --help`` and the other
commands do not import them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later
from qmath_megatron.utils.run_summary import count, format_run_summary, print_run_summary


@dataclass
class InspectConfig:
    """``qmath data inspect``: one indexed dataset, and optionally one document of it."""

    prefix: str  # PREFIX of PREFIX.bin/PREFIX.idx (either file name works too)
    doc: int | None = None
    tokenizer: str | None = None  # decode the document with this tokenizer directory


@dataclass
class GenerateConfig:
    """``qmath data generate``: the project's own generated data as one JSONL file (the
    pipeline's tiny recipe, the demo and the tests make their data with it)."""

    kind: str
    output: str
    n: int = 100
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        from qmath_megatron.data.synthetic import GENERATED_KINDS

        if self.kind not in GENERATED_KINDS:
            raise ValueError(
                f"--kind must be one of {', '.join(GENERATED_KINDS)}, got {self.kind!r}"
            )
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")


def run_generate(args: argparse.Namespace) -> int:
    from qmath_megatron.data.synthetic import write_generated

    cfg: GenerateConfig = build_config(args)
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_generated(cfg.kind, out, cfg.n, cfg.seed)
    print(
        f"qmath data generate: {cfg.n:,} {cfg.kind} rows (seed {cfg.seed}) -> {out}",
        file=sys.stderr,
    )
    return 0


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.data.synthetic import GENERATED_KINDS

    a = ConfigArgs(p, GenerateConfig)
    a.add("kind", required=True, choices=list(GENERATED_KINDS), help="what to generate")
    a.add("output", required=True, help="JSONL file to write (under a temporary name first)")
    a.add("n", help="rows")
    a.add("seed", help="same seed, same rows")
    a.add("overwrite", help="replace an existing file")
    a.finish()


def add_input_limits(a: ConfigArgs) -> None:
    """``--max-line-bytes`` and ``--allow-truncated`` of the tools that read JSONL records
    one by one (sft-prepare, rm-prepare, rl-prompts)."""
    a.add(
        "max_line_bytes",
        type=int,
        help="a JSONL line longer than this is rejected unparsed (line_too_long; default 16 MiB)",
    )
    a.add(
        "allow_truncated",
        help="a truncated .gz/.zst: keep its readable part (one truncated_input reject)",
    )


def add_common(a: ConfigArgs, *, text_key: bool = True) -> None:
    """Flags every sharded data tool has (``--workers`` where its config has workers)."""
    a.add(
        "overwrite",
        help="redo from scratch when the output holds a run with other inputs/settings (or exists)",
    )
    a.add(
        "allow_truncated",
        help="read the readable part of a truncated .gz/.zst (+ one truncated_input reject) "
        "instead of failing",
    )
    if "workers" in {f.name for f in dataclasses.fields(a.config)}:
        a.add("workers", help="worker processes")
    if text_key:
        a.add("text_key", help="field holding the text")


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.data.tokenize import TokenizeConfig

    a = ConfigArgs(p, TokenizeConfig)
    a.add(
        "inputs",
        "--input",
        required=True,
        action="append",
        help="input file or glob (.jsonl, .jsonl.gz, .jsonl.zst, .parquet); repeatable",
    )
    a.add("output_prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    a.add("tokenizer", required=True, help="local HF tokenizer directory")
    add_common(a, text_key=False)
    default_keys = " ".join(TokenizeConfig.__dataclass_fields__["text_keys"].default_factory())
    a.add(
        "text_keys",
        "--text-key",
        action="append",
        help="field holding the text (repeatable: the first present key is used; "
        f"default {default_keys})",
    )
    a.add("chunk_mb", help="plain JSONL is split into chunks of this size")
    a.add(
        "append_eod", "--no-eod", negate=True, help="do not append <|endoftext|> to each document"
    )
    a.add(
        "keep_shards", help="keep per-shard datasets and write PREFIX.blend.txt instead of merging"
    )
    a.add("rejects_file", help="write rejected records (with reasons) here")
    a.add(
        "max_bad_fraction",
        help="fail if more than this fraction of records is rejected (default 1.0: never)",
    )
    a.add("fast_path", "--no-fast-path", negate=True, help="always use the HF tokenizer")
    a.add("progress", "--no-progress", negate=True)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.finish()


def run_tokenize(args: argparse.Namespace) -> int:
    from qmath_megatron.data.tokenize import tokenize_corpus

    cfg = build_config(args)
    cfg = dataclasses.replace(cfg, progress=cfg.progress and sys.stderr.isatty())
    summary = tokenize_corpus(cfg)
    if args.json:
        print(json.dumps(summary))
        print_run_summary(tokenize_summary(cfg, summary), stderr=True)
        return 0
    secs = max(summary["seconds"], 1e-9)
    print(
        f"wrote {summary['output_prefix']}.bin/.idx ({summary['dtype']}, tokenizer backend "
        f"{summary['backend']}, {summary['workers']} workers)"
    )
    print(
        f"  documents {summary['documents']:,}  tokens {summary['tokens']:,}  "
        f"bytes {summary['bytes']:,}"
    )
    print(
        f"  {secs:.1f} s: {summary['documents'] / secs:,.0f} docs/s, "
        f"{summary['tokens'] / secs:,.0f} tokens/s, "
        f"{summary['bytes'] / secs / 1e6:.1f} MB/s"
    )
    rejects = {k: v for k, v in summary["rejects"].items() if v}
    print(f"  rejected {summary['rejected']:,}" + (f": {rejects}" if rejects else ""))
    if summary["resumed_units"]:
        print(
            f"  resumed: {summary['resumed_units']} of {summary['units']} units were already done"
        )
    print_run_summary(tokenize_summary(cfg, summary))
    return 0


def tokenize_summary(cfg: Any, summary: dict) -> str:
    prefix = summary["output_prefix"]
    blend_file = summary.get("blend_file")
    # --keep-shards: the blend file's `weight prefix ...` words are data.blend's list
    words = Path(blend_file).read_text().split() if blend_file else [prefix]
    train = ["qmath", "train", "pretrain", "--recipe", "qwen25_math_7b_cpt"]
    train += [f"data.blend={json.dumps(words)}", f"data.tokenizer={cfg.tokenizer}"]
    train += ["checkpoint.save=ckpt_cpt/"]
    return format_run_summary(
        f"done: data tokenize ({summary['documents'] / max(summary['seconds'], 1e-9):,.0f} "
        f"docs/s, {summary['workers']} workers)",
        {
            "dataset": blend_file or f"{prefix}.bin/.idx",
            "set aside": cfg.rejects_file if cfg.rejects_file and summary["rejected"] else None,
        },
        {
            "documents": summary["documents"],
            "tokens": summary["tokens"],
            "rejected": count(summary["rejected"]),
        },
        shlex.join(train),
    )


def run_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from qmath_megatron.data.indexed import validate_indexed_dataset

    cfg = build_config(args)
    prefix = cfg.prefix[:-4] if cfg.prefix.endswith((".bin", ".idx")) else cfg.prefix
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
            f"  sequence length: min {lengths.min()}, mean {lengths.mean():.1f}, "
            f"max {lengths.max()}"
        )
    if cfg.doc is not None:
        if not 0 <= cfg.doc < len(ds):
            raise ValueError(f"--doc {cfg.doc} out of range (0..{len(ds) - 1})")
        ids = np.asarray(ds[cfg.doc]).tolist()
        print(f"document {cfg.doc}: {len(ids)} tokens")
        if cfg.tokenizer:
            from qmath_megatron.tokenizer.qwen import load_tokenizer

            print(load_tokenizer(cfg.tokenizer).decode(ids))
        else:
            print(ids)
    return 0


def register(
    subparsers: argparse._SubParsersAction, steps: Sequence[Callable[[Any], None]] = ()
) -> None:
    """Add ``qmath data``; ``steps`` add the other packages' data steps (each is a
    ``register_data(subparsers)``; :mod:`qmath_megatron.cli` passes them)."""
    data = subparsers.add_parser("data", help="data preparation: tokenize, inspect")
    sub = data.add_subparsers(dest="data_command", metavar="STEP", required=True)
    t = sub.add_parser("tokenize", help="JSONL/Parquet -> Megatron indexed dataset (.bin/.idx)")
    build_later(t, add_tokenize_arguments)
    t.set_defaults(func=run_tokenize)
    g = sub.add_parser(
        "generate", help="the project's generated data: corpus, problems, SFT chats, toy domain"
    )
    build_later(g, _add_generate_arguments)
    g.set_defaults(func=run_generate)
    for add_steps in steps:  # curation, then the training stages' data steps
        add_steps(sub)
    i = sub.add_parser("inspect", help="counts of an indexed dataset; decode document N")
    build_later(i, _add_inspect_arguments)
    i.set_defaults(func=run_inspect)


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    a = ConfigArgs(p, InspectConfig)
    a.add("prefix", "prefix", help="PREFIX of PREFIX.bin/PREFIX.idx")
    a.add("doc", help="document to print")
    a.add("tokenizer", help="decode with this tokenizer directory")
    a.finish()

"""``qmath data sft-prepare`` and ``qmath data rft``: the SFT stage's data steps, added to
the ``qmath data`` group by :func:`register_data`.

Their flags come from their config dataclasses (:mod:`qmath_megatron.config.cli`), added
when the step is used; the implementation modules (which hold the config dataclasses) are
imported inside the functions that build a step's flags and run it, so that ``qmath --help``
and the other commands do not import them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later
from qmath_megatron.data.cli import add_input_limits
from qmath_megatron.tokenizer import chat
from qmath_megatron.utils.run_summary import count, format_run_summary, print_run_summary


def run_sft_prepare(args: argparse.Namespace) -> int:
    from qmath_megatron.sft.dataset import LOSS_MASK_SUFFIX, REPORT_SUFFIX
    from qmath_megatron.sft.prepare import prepare_sft

    cfg = build_config(args)
    report = prepare_sft(cfg)
    if args.json:
        print(json.dumps(report))
        print_run_summary(sft_prepare_summary(cfg, report), stderr=True)
        return 0
    rejects = {k: v for k, v in report["rejects"].items() if v}
    print(
        f"wrote {cfg.output_prefix}.bin/.idx, {cfg.output_prefix}{LOSS_MASK_SUFFIX}.bin/.idx, "
        f"{cfg.output_prefix}{REPORT_SUFFIX} ({report['mode']}, seq length {report['seq_length']})"
    )
    print(
        f"  lines {report['lines']:,}: samples {report['samples']:,}, rejected "
        f"{report['rejected']:,}"
        + (f" {rejects} -> {report['rejects_file']}" if rejects else "")
        + (f", truncated {report['truncated']:,}" if report["truncated"] else "")
    )
    print(
        f"  tokens {report['tokens']:,} (trained {report['trained_tokens']:,}) in "
        f"{report['sequences']:,} packed sequences "
        f"(lower bound {report['lower_bound_sequences']:,})"
    )
    print(
        f"  packing efficiency {report['packing_efficiency']:.2%} (one sample per sequence: "
        f"{report['naive_efficiency']:.2%})"
    )
    print_run_summary(sft_prepare_summary(cfg, report))
    return 0


def sft_prepare_summary(cfg: Any, report: dict) -> str:
    from qmath_megatron.sft.dataset import LOSS_MASK_SUFFIX, REPORT_SUFFIX

    prefix = cfg.output_prefix
    rejected = count(report["rejected"])
    train = shlex.join(
        ["qmath", "train", "sft", "--recipe", "qwen25_math_7b_sft", f"data.prefix={prefix}"]
        + ["model.init_from=CKPT/", "checkpoint.save=ckpt_sft/"]
    )
    return format_run_summary(
        f"done: data sft-prepare ({report['mode']}, seq length {report['seq_length']})",
        {
            "dataset": f"{prefix}.bin/.idx, {prefix}{LOSS_MASK_SUFFIX}.bin/.idx",
            "report": f"{prefix}{REPORT_SUFFIX}",
            "set aside": report["rejects_file"] if rejected else None,
        },
        {
            "lines": report["lines"],
            "kept": f"{report['samples']:,} samples in {report['sequences']:,} packed sequences "
            f"({report['tokens']:,} tokens, {report['truncated']:,} truncated)",
            "rejected": rejected,
        },
        train,
    )


def _sft_prepare_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.sft.prepare import SFTPrepareConfig

    a = ConfigArgs(p, SFTPrepareConfig)
    a.add(
        "inputs",
        "--input",
        required=True,
        nargs="+",
        action="extend",
        help="chat JSONL(.gz/.zst) files or globs with a `messages` list",
    )
    a.add(
        "output_prefix",
        required=True,
        help="writes PREFIX.bin/.idx, PREFIX.loss_mask.bin/.idx, PREFIX.report.json",
    )
    a.add("tokenizer", required=True, help="HF tokenizer directory with the chat template")
    a.add("seq_length")
    a.add(
        "mode",
        choices=chat.MODES,
        help="tir: the ```output blocks of assistant turns are not trained",
    )
    a.add("truncate", help="cut over-long samples to --seq-length instead of rejecting them")
    a.add(
        "default_system",
        "--no-default-system",
        negate=True,
        help="leave conversations without a system turn as they are "
        "(default: add the mode's system prompt)",
    )
    a.add("rejects_file", help="default PREFIX.rejects.jsonl")
    a.add("workers", help="processes rendering and tokenizing (same output for any number)")
    add_input_limits(a)
    a.add("overwrite")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a.finish()


def run_rft_command(args: argparse.Namespace) -> int:
    from qmath_megatron.sft.rft import run_rft

    cfg = build_config(args)
    r = run_rft(cfg)
    print(
        f"rft ({r['mode']}, n={r['n']}, k={r['k']}): {r['problems']:,} problems "
        f"({r['with_reference']:,} with a reference), {r['problems_kept']:,} kept, "
        f"{r['unsolved']:,} unsolved, {r['rejected']:,} rejected lines"
    )
    print(
        f"  {r['responses_kept']:,} responses kept of {r['responses']:,} "
        f"({r['correct_responses']:,} correct) -> {cfg.output}/sft/"
    )
    if r["resumed_shards"]:
        print(f"  resumed: {r['resumed_shards']} shard(s) were already done")
    print_run_summary(rft_summary(cfg, r))
    return 0


def rft_summary(cfg: Any, r: dict) -> str:
    out = cfg.output.rstrip("/")
    prepare = ["qmath", "data", "sft-prepare", "--input", f"{out}/sft/*"]
    prepare += ["--output-prefix", "data/sft_rft", "--tokenizer", cfg.tokenizer or cfg.model]
    return format_run_summary(
        f"done: data rft ({r['mode']}, n={r['n']}, k={r['k']})",
        {
            "sft data": f"{out}/sft/",
            "set aside": f"{out}/unsolved/" + (f", {out}/rejects/" if r["rejected"] else ""),
            "report": f"{out}/report.json",
        },
        {
            "problems": r["problems"],
            "kept": f"{r['problems_kept']:,} problems, {r['responses_kept']:,} responses "
            f"(of {r['responses']:,}, {r['correct_responses']:,} correct)",
            "unsolved": r["unsolved"],
            "rejected": count(r["rejected"]),
        },
        shlex.join(prepare + ["--mode", r["mode"]]),
    )


def _rft_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.sft.rft import RFTConfig

    a = ConfigArgs(p, RFTConfig)
    a.add(
        "problems",
        required=True,
        nargs="+",
        action="extend",
        help="problem JSONL(.gz/.zst) files or globs (`problem`, optional `answer`, `id`)",
    )
    a.add("model", required=True, help="HF model directory or qmath checkpoint")
    a.add(
        "output", required=True, help="writes DIR/sft, DIR/unsolved, DIR/rejects, DIR/report.json"
    )
    a.add("n", help="responses sampled per problem")
    a.add("k", help="responses kept per problem")
    a.add("mode", choices=chat.MODES)
    a.add("scorer", help="reward model: ranks responses and weighs votes")
    a.add("tokenizer", help="tokenizer directory (for a Megatron checkpoint)")
    a.add("engine", choices=["auto", "vllm", "transformers"])
    a.add("temperature")
    a.add("top_p")
    a.add("max_new_tokens")
    a.add("seed")
    a.add("batch_size", help="transformers engine: prompts per generate call")
    a.add("tensor_parallel_size", help="vLLM")
    a.add(
        "max_similarity",
        help="responses at least this similar (word 3-gram Jaccard) count as one path",
    )
    a.add("problem_key")
    a.add("answer_key", help="reference answer field (optional per line)")
    a.add("id_key")
    a.add(
        "reference_solution_key",
        help="field with a worked solution: added to the problem's RM group (groups/) as a "
        "correct response",
    )
    a.add("overwrite", help="redo a run made with other settings")
    a.finish()


def register_data(sub: Any) -> None:
    """Add the SFT data steps to the ``qmath data`` subparsers."""
    p = sub.add_parser("sft-prepare", help="chat JSONL -> packed, loss-masked SFT dataset")
    build_later(p, _sft_prepare_flags)
    p.set_defaults(func=run_sft_prepare)
    p = sub.add_parser("rft", help="rejection-sampling SFT data: sample n, keep k correct/voted")
    build_later(p, _rft_flags)
    p.set_defaults(func=run_rft_command)

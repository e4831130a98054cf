"""``qmath rm score`` (batched reward-model scoring of a JSONL file) and ``qmath data
rm-prepare`` (the reward-model groups, added to ``qmath data`` by :func:`register_data`).

Their flags come from their config dataclasses (:mod:`qmath_megatron.config.cli`). The
implementation modules are imported inside the functions that build a command's flags and
run it (the scorer needs torch; ``reward_model.data`` numpy), so that ``qmath --help`` and
``qmath data --help`` do not import them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from typing import Any, Literal

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later
from qmath_megatron.data.cli import add_input_limits
from qmath_megatron.tokenizer import chat
from qmath_megatron.utils.run_summary import count, format_run_summary, print_run_summary


@dataclass
class ScoreConfig:
    """``qmath rm score``: which reward model scores which JSONL file, and how."""

    model: str  # HF reward-model directory or Megatron RM checkpoint
    input: str  # JSONL rows to score
    output: str  # JSONL to write (input rows + rm_score)
    tokenizer: str | None = None  # default: the model's; required for a Megatron checkpoint
    batch_size: int = 8  # sequences per forward pass
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # HF model (a checkpoint keeps its own)
    engine: Literal["transformers", "vllm"] = "transformers"
    tp: int | None = None  # Megatron checkpoint: TP to score at (None: as saved)
    pp: int | None = None
    mode: Literal["cot", "tir"] = "cot"  # system prompt of prompt + response rows
    # a row over the model's positions: refuse, or keep its first tokens
    too_long: Literal["error", "truncate"] = "error"
    overwrite: bool = False


def _score(args: argparse.Namespace) -> int:
    from qmath_megatron.reward_model.scoring import RewardModelScorer, score_file

    cfg = build_config(args)
    scorer = RewardModelScorer(
        cfg.model,
        cfg.tokenizer,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        tp=cfg.tp,
        pp=cfg.pp,
        mode=cfg.mode,
        engine=cfg.engine,
    )
    summary = score_file(
        scorer, cfg.input, cfg.output, overwrite=cfg.overwrite, too_long=cfg.too_long
    )
    print(
        json.dumps(summary)
        if args.json
        else (
            f"scored {summary['rows']} rows with {cfg.model} ({scorer.kind}) "
            f"-> {summary['output']} "
            f"(mean rm_score {summary['mean_score']:.4f})"
            + (f"; {summary['truncated']} rows truncated" if summary["truncated"] else "")
        )
    )
    print_run_summary(rm_score_summary(cfg, summary), stderr=args.json)
    return 0


def rm_score_summary(cfg: ScoreConfig, summary: dict) -> str:
    evaluate = ["qmath", "eval", "--model", "POLICY_HF/", "--benchmarks", "gsm8k,math500"]
    evaluate += ["--n", "8", "--temperature", "0.7", "--rm", cfg.model]
    return format_run_summary(
        "done: rm score",
        {"scored rows": summary["output"]},
        {
            "rows": summary["rows"],
            "mean rm_score": summary["mean_score"],
            "truncated": summary["truncated"] or None,
        },
        shlex.join(evaluate),  # the reward model's rm@k on the benchmarks
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    rm = subparsers.add_parser("rm", help="reward model: scoring (train with `qmath train rm`)")
    sub = rm.add_subparsers(dest="rm_command", metavar="COMMAND", required=True)
    p = sub.add_parser(
        "score",
        help="add rm_score to every row of a JSONL file",
        description="Each row holds `messages` (a chat ending in the assistant's response) or "
        "`prompt` + `response` (rendered as the CoT system prompt, user prompt, assistant "
        "response). The chat template's text (no generation prompt, no added special tokens) "
        "is scored at its last token, as the published Qwen2.5-Math-RM model card does.",
    )
    a = ConfigArgs(p, ScoreConfig)
    a.add(
        "model",
        required=True,
        help="HF reward-model directory (Qwen2ForRewardModel) or Megatron RM checkpoint",
    )
    a.add("input", required=True, help="JSONL rows to score")
    a.add("output", required=True, help="JSONL to write (input rows + rm_score)")
    a.add(
        "tokenizer",
        help="tokenizer directory (default: --model; required for a Megatron checkpoint)",
    )
    a.add("batch_size", help="sequences per forward pass")
    a.add(
        "dtype",
        choices=["fp32", "bf16", "fp16"],
        help="HF model dtype (a Megatron checkpoint runs in its own dtype)",
    )
    a.add(
        "engine",
        choices=["transformers", "vllm"],
        help="HF directory: plain PyTorch (default) or vLLM's Qwen2ForRewardModel",
    )
    a.add("tp", help="Megatron checkpoint: TP to score at (default: as saved)")
    a.add("pp", help="Megatron checkpoint: PP to score at (default: as saved)")
    a.add(
        "mode",
        choices=["cot", "tir"],
        help="system prompt for prompt + response rows (default cot)",
    )
    a.add(
        "too_long",
        choices=["error", "truncate"],
        help="a row with more tokens than the model's positions: error (default; names the "
        "line) or truncate: keep its first tokens and score the last kept one (from the "
        "right, so the system prompt and problem the response is judged against stay)",
    )
    a.add("overwrite", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a.finish()
    p.set_defaults(func=_score)


def run_rm_prepare(args: argparse.Namespace) -> int:
    from qmath_megatron.reward_model.data import LABELS_SUFFIX, REPORT_SUFFIX, prepare_rm

    cfg = build_config(args)
    report = prepare_rm(cfg)
    if args.json:
        print(json.dumps(report))
        print_run_summary(rm_prepare_summary(cfg, report), stderr=True)
        return 0
    p = cfg.output_prefix
    print(f"wrote {p}.bin/.idx, {p}{LABELS_SUFFIX}, {p}{REPORT_SUFFIX}")
    print(
        f"  lines {report['lines']:,}: kept {report['kept']:,} groups, dropped "
        f"{report['dropped']:,} {report['dropped_by_reason']} -> {p}.dropped.jsonl, rejected "
        f"{report['rejected']:,} -> {p}.rejects.jsonl"
    )
    print(
        f"  {report['responses']:,} responses ({report['positives']:,} correct, "
        f"{report['negatives']:,} wrong; {report['responses_too_long']:,} over --seq-length "
        f"removed), {report['tokens']:,} tokens"
    )
    print_run_summary(rm_prepare_summary(cfg, report))
    return 0


def rm_prepare_summary(cfg: Any, report: dict) -> str:
    from qmath_megatron.reward_model.data import LABELS_SUFFIX, REPORT_SUFFIX

    p = cfg.output_prefix
    train = ["qmath", "train", "rm", "--recipe", "qwen25_math_rm_7b", f"data.prefix={p}"]
    train += ["model.init_from=SFT_CKPT/", "checkpoint.save=ckpt_rm/"]
    return format_run_summary(
        "done: data rm-prepare",
        {
            "dataset": f"{p}.bin/.idx, {p}{LABELS_SUFFIX}",
            "report": f"{p}{REPORT_SUFFIX}",
            "set aside": ", ".join(
                [f"{p}.dropped.jsonl"] * bool(report["dropped"])
                + [f"{p}.rejects.jsonl"] * bool(report["rejected"])
            )
            or None,
        },
        {
            "lines": report["lines"],
            "kept": f"{report['kept']:,} groups, {report['responses']:,} responses "
            f"({report['positives']:,} correct, {report['negatives']:,} wrong), "
            f"{report['tokens']:,} tokens",
            "dropped": count(report["dropped"]),
            "rejected": count(report["rejected"]),
        },
        shlex.join(train),
    )


def register_data(sub: Any) -> None:
    """Add ``qmath data rm-prepare`` to the ``qmath data`` subparsers."""
    p = sub.add_parser(
        "rm-prepare", help="prompt + labelled responses JSONL -> reward-model groups"
    )
    build_later(p, _rm_prepare_flags)
    p.set_defaults(func=run_rm_prepare)


def _rm_prepare_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.reward_model.data import RMPrepareConfig

    a = ConfigArgs(p, RMPrepareConfig)
    a.add(
        "inputs",
        "--input",
        required=True,
        nargs="+",
        action="extend",
        help="JSONL(.gz/.zst) files or globs: {prompt|messages, responses: [{text, correct}]}",
    )
    a.add(
        "output_prefix",
        required=True,
        help="writes PREFIX.bin/.idx, PREFIX.labels.npy, PREFIX.report.json, "
        "PREFIX.dropped.jsonl, PREFIX.rejects.jsonl",
    )
    a.add("tokenizer", required=True, help="HF tokenizer directory with the chat template")
    a.add("seq_length", help="longer responses are removed from their group (counted)")
    a.add("mode", choices=chat.MODES, help="system prompt for `prompt` rows (default cot)")
    add_input_limits(a)
    a.add("overwrite", help="replace an existing dataset")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    a.finish()

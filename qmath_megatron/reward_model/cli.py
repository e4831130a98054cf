"""``qmath rm score``: batched reward-model scoring of a JSONL file."""

from __future__ import annotations

import argparse
import json


def _score(args: argparse.Namespace) -> int:
    from qmath_megatron.reward_model.scoring import RewardModelScorer, score_file

    scorer = RewardModelScorer(
        args.model,
        args.tokenizer,
        batch_size=args.batch_size,
        dtype=args.dtype,
        tp=args.tp,
        pp=args.pp,
        mode=args.mode,
        engine=args.engine,
    )
    summary = score_file(scorer, args.input, args.output, overwrite=args.overwrite)
    print(
        json.dumps(summary)
        if args.json
        else (
            f"scored {summary['rows']} rows with {args.model} ({scorer.kind}) -> {summary['output']} "
            f"(mean rm_score {summary['mean_score']:.4f})"
        )
    )
    return 0


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
    p.add_argument(
        "--model",
        required=True,
        help="HF reward-model directory (Qwen2ForRewardModel) or Megatron RM checkpoint",
    )
    p.add_argument("--input", required=True, help="JSONL rows to score")
    p.add_argument("--output", required=True, help="JSONL to write (input rows + rm_score)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer directory (default: --model; required for a Megatron checkpoint)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="HF model dtype (a Megatron checkpoint runs in its own dtype)",
    )
    p.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="HF directory: plain PyTorch (default) or vLLM's Qwen2ForRewardModel",
    )
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="Megatron checkpoint: TP to score at (default: as saved)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=None,
        help="Megatron checkpoint: PP to score at (default: as saved)",
    )
    p.add_argument(
        "--mode",
        default="cot",
        choices=["cot", "tir"],
        help="system prompt for prompt + response rows (default cot)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_score)

"""``qmath data rl-prompts``: the GRPO stage's query filter, added to the ``qmath data``
group by :func:`register_data`.

Its flags come from ``RLPromptsConfig`` (:mod:`qmath_megatron.config.cli`), added when the
step is used; :mod:`qmath_megatron.rl.prompts` is imported inside the functions that build
the flags and run the step, so that ``qmath --help`` and the other commands do not import it.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from qmath_megatron.config.cli import ConfigArgs, build_config, build_later
from qmath_megatron.data.cli import add_input_limits
from qmath_megatron.tokenizer import chat
from qmath_megatron.utils.run_summary import count, format_run_summary, print_run_summary


def run_rl_prompts_command(args: argparse.Namespace) -> int:
    from qmath_megatron.rl.prompts import output_paths, run_rl_prompts

    cfg = build_config(args)
    r = run_rl_prompts(cfg)
    p = output_paths(cfg.output)
    print(
        f"rl-prompts ({r['mode']}): {r['lines']:,} lines, {r['kept']:,} kept "
        f"({cfg.min_correct}..{cfg.max_correct} of {cfg.n} correct) -> {p.kept}; "
        f"{r['too_easy']:,} too easy, {r['too_hard']:,} too hard -> {p.removed}; "
        f"{r['rejected']:,} rejected -> {p.rejects}"
    )
    print(f"  correct-count histogram: {r['correct_histogram']}; report -> {p.report}")
    if r["resumed_shards"]:
        print(f"  resumed: {r['resumed_shards']} of {r['shards']} shard(s) were already done")
    print_run_summary(rl_prompts_summary(cfg, r, p))
    return 0


def rl_prompts_summary(cfg: Any, r: dict, p: Any) -> str:
    """``p``: the run's ``output_paths``."""
    train = ["qmath", "train", "grpo", "--recipe", "qwen25_math_7b_grpo", "model.init_from=CKPT/"]
    train += [f"data.prompts={p.kept}", "checkpoint.save=ckpt_grpo/"]
    return format_run_summary(
        f"done: data rl-prompts ({r['mode']}, keep {cfg.min_correct}..{cfg.max_correct} "
        f"of {cfg.n} correct)",
        {
            "prompts": str(p.kept),
            "set aside": f"{p.removed}" + (f", {p.rejects}" if r["rejected"] else ""),
            "report": str(p.report),
        },
        {
            "lines": r["lines"],
            "kept": r["kept"],
            "removed": f"{r['too_easy'] + r['too_hard']:,} ({r['too_easy']:,} too easy, "
            f"{r['too_hard']:,} too hard)",
            "rejected": count(r["rejected"]),
        },
        shlex.join(train),
    )


def register_data(sub: Any) -> None:
    """Add ``qmath data rl-prompts`` to the ``qmath data`` subparsers."""
    p = sub.add_parser(
        "rl-prompts", help="keep problems the SFT model solves 2..5 of 8 times (GRPO queries)"
    )
    build_later(p, _rl_prompts_flags)
    p.set_defaults(func=run_rl_prompts_command)


def _rl_prompts_flags(p: argparse.ArgumentParser) -> None:
    from qmath_megatron.rl.prompts import RLPromptsConfig

    a = ConfigArgs(p, RLPromptsConfig)
    a.add(
        "problems",
        required=True,
        nargs="+",
        action="extend",
        help="JSONL(.gz/.zst)/Parquet files or globs with `problem` and `answer`",
    )
    a.add("model", required=True, help="the SFT model's HF directory")
    a.add(
        "output",
        required=True,
        help="kept problems (F.jsonl); F.removed.jsonl, F.rejects.jsonl, F.report.json "
        "and the resumable run F.shards/ beside it",
    )
    a.add("n", help="responses sampled per problem")
    a.add("min_correct", help="keep problems solved at least this often (default: ceil(2n/8))")
    a.add(
        "max_correct",
        help="keep problems solved at most this often (default: floor(5n/8); 2..5 of 8)",
    )
    a.add("mode", choices=chat.MODES, help="tir: TIR rollouts (rl/tir.py), code run in the sandbox")
    a.add("engine", choices=["auto", "vllm", "transformers"])
    a.add("temperature")
    a.add("top_p")
    a.add("max_new_tokens")
    a.add("seed")
    a.add("batch_size", help="problems per generate call")
    a.add("problem_key")
    a.add("answer_key")
    a.add("shard_mb", help="plain JSONL inputs are cut into shards of this size (the resume unit)")
    add_input_limits(a)
    a.add("overwrite", help="redo a run made with other settings or inputs")
    a.finish()

"""``qmath data rl-prompts``: the RL query filter of the Qwen2.5-Math report.

Sample ``n`` responses per problem with the SFT model, check each against the reference
answer with the shared answer checker, and keep the problems the model solves
sometimes but not always (``min_correct <= correct <= max_correct``; the report's 2..5 of
8): too easy or too hard queries give GRPO groups with zero reward variance, which teach
nothing.

Every input line ends in exactly one output: ``--output`` (kept, with ``rl_correct`` and
``rl_n``), ``<output stem>.removed.jsonl`` (same fields plus ``reason``: ``too_easy`` /
``too_hard``) or ``<output stem>.rejects.jsonl`` (``line``, ``reason``, ``raw``: unreadable
JSON, no problem text, no reference answer).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RLPromptsConfig:
    problems: str
    model: str
    output: str
    n: int = 8
    min_correct: int = 2
    max_correct: int = 5
    engine: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 64  # problems per generate call
    problem_key: str = "problem"
    answer_key: str = "answer"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("--n and --batch-size must be >= 1")
        if not 0 <= self.min_correct <= self.max_correct <= self.n:
            raise ValueError(
                f"need 0 <= --min-correct ({self.min_correct}) <= --max-correct "
                f"({self.max_correct}) <= --n ({self.n})"
            )


def side_paths(output: str | Path) -> tuple[Path, Path]:
    out = Path(output)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".removed.jsonl"), out.with_name(stem + ".rejects.jsonl")


def _read(cfg: RLPromptsConfig, rejects: Any, stats: Counter) -> list[tuple[int, dict]]:
    path = Path(cfg.problems)
    if not path.is_file():
        raise FileNotFoundError(f"problems file not found: {path}")
    good = []
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                stats["blank_lines"] += 1
                continue
            reason = None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj, reason = None, "invalid_json"
            if reason is None and not isinstance(obj, dict):
                reason = "not_an_object"
            elif reason is None and not str(obj.get(cfg.problem_key) or "").strip():
                reason = "no_problem"
            elif reason is None and not str(obj.get(cfg.answer_key) or "").strip():
                reason = "no_answer"
            if reason:
                rejects.write(
                    json.dumps({"line": no, "reason": reason, "raw": line.rstrip("\n")}) + "\n"
                )
                stats["rejected"] += 1
                continue
            good.append((no, obj))
    return good


def run_rl_prompts(cfg: RLPromptsConfig, *, engine: Any = None, checker: Any = None) -> dict:
    """Filter ``cfg.problems``; returns counts (also printed by the CLI)."""
    from qmath_megatron.inference.engine import SamplingParams, make_engine
    from qmath_megatron.rewards.checker import AnswerChecker
    from qmath_megatron.rewards.extract import extract_answer
    from qmath_megatron.tokenizer import chat

    out = Path(cfg.output)
    removed_path, rejects_path = side_paths(out)
    existing = [p for p in (out, removed_path, rejects_path) if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} exists (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    stats: Counter = Counter()
    own_checker = checker is None
    checker = checker or AnswerChecker()
    partial = [p.with_name(p.name + ".partial") for p in (out, removed_path, rejects_path)]
    try:
        with (
            partial[0].open("w") as kept,
            partial[1].open("w") as removed,
            partial[2].open("w") as rejects,
        ):
            problems = _read(cfg, rejects, stats)
            if problems and engine is None:
                engine = make_engine(cfg.model, cfg.engine)
            histogram: Counter = Counter()
            for start in range(0, len(problems), cfg.batch_size):
                chunk = problems[start : start + cfg.batch_size]
                tok = engine.tokenizer
                prompts = [chat.build_prompt(tok, str(o[cfg.problem_key]), "cot") for _, o in chunk]
                params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + start,
                                        stop_token_ids=chat.chat_stop_token_ids(tok))  # fmt: skip
                groups = engine.generate(prompts, params)
                pairs = [(str(o[cfg.answer_key]), extract_answer(c.text))
                         for (_, o), g in zip(chunk, groups, strict=True) for c in g]  # fmt: skip
                verdicts = [r.equal for r in checker.equivalent_many(pairs)]
                for i, (_, obj) in enumerate(chunk):
                    correct = sum(verdicts[i * cfg.n : (i + 1) * cfg.n])
                    histogram[correct] += 1
                    record = {**obj, "rl_correct": correct, "rl_n": cfg.n}
                    if correct < cfg.min_correct:
                        removed.write(json.dumps({**record, "reason": "too_hard"}) + "\n")
                        stats["too_hard"] += 1
                    elif correct > cfg.max_correct:
                        removed.write(json.dumps({**record, "reason": "too_easy"}) + "\n")
                        stats["too_easy"] += 1
                    else:
                        kept.write(json.dumps(record) + "\n")
                        stats["kept"] += 1
        for tmp, final in zip(partial, (out, removed_path, rejects_path), strict=True):
            tmp.replace(final)
    finally:
        for tmp in partial:
            tmp.unlink(missing_ok=True)
        if own_checker:
            checker.close()
    return {"problems": len(problems) + stats["rejected"], "kept": stats["kept"],
            "too_easy": stats["too_easy"], "too_hard": stats["too_hard"],
            "rejected": stats["rejected"], "correct_histogram": dict(sorted(histogram.items()))}  # fmt: skip


def _run_cli(args: Any) -> int:
    cfg = RLPromptsConfig(problems=args.problems, model=args.model, output=args.output, n=args.n,
                          min_correct=args.min_correct, max_correct=args.max_correct,
                          engine=args.engine, temperature=args.temperature, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed,
                          batch_size=args.batch_size, overwrite=args.overwrite)  # fmt: skip
    r = run_rl_prompts(cfg)
    removed, rejects = side_paths(cfg.output)
    print(f"rl-prompts: {r['problems']:,} problems, {r['kept']:,} kept "
          f"({cfg.min_correct}..{cfg.max_correct} of {cfg.n} correct) -> {cfg.output}; "
          f"{r['too_easy']:,} too easy, {r['too_hard']:,} too hard -> {removed}; "
          f"{r['rejected']:,} rejected -> {rejects}")  # fmt: skip
    print(f"  correct-count histogram: {r['correct_histogram']}")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``qmath data rl-prompts`` on the ``qmath data`` subparsers."""
    d = RLPromptsConfig.__dataclass_fields__
    p = sub.add_parser("rl-prompts", help="keep problems the SFT model solves 2..5 of 8 times (GRPO queries)")  # fmt: skip
    p.add_argument("--problems", required=True, help="JSONL with `problem` and `answer`")
    p.add_argument("--model", required=True, help="the SFT model's HF directory")
    p.add_argument("--output", required=True, help="kept problems (JSONL); .removed/.rejects beside it")  # fmt: skip
    p.add_argument("--n", type=int, default=d["n"].default, help="responses sampled per problem")
    p.add_argument("--min-correct", type=int, default=d["min_correct"].default)
    p.add_argument("--max-correct", type=int, default=d["max_correct"].default)
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--temperature", type=float, default=d["temperature"].default)
    p.add_argument("--top-p", type=float, default=d["top_p"].default)
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="problems per generate call")  # fmt: skip
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_cli)

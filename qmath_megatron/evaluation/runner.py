"""``qmath eval``: generate on benchmarks (CoT and TIR), save samples, score, report.

Layout of an output directory::

    OUT/summary.json                       {"BENCH/MODE": metrics, ..., "k": K, ...}
    OUT/config.json                        the resolved job
    OUT/BENCH/MODE/samples.jsonl           one problem per line (the `qmath eval metrics` input)
    OUT/BENCH/MODE/metrics.json            {"greedy", "pass@K", "maj@K", "rm@K"} in percent
    OUT/BENCH/MODE/scored.jsonl            per-completion extracted answers and correctness
    OUT/hf_model/                          the HF export, when --model is a Megatron checkpoint

A benchmark/mode whose ``samples.jsonl`` exists with the same generation settings is not
generated again (it is re-scored); different settings are refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from qmath_megatron.checkpoint.model_checkpoint import CheckpointError, resolve_checkpoint
from qmath_megatron.convert.commands import mcore_to_hf
from qmath_megatron.data.shards import path_fingerprint, settings_changes
from qmath_megatron.evaluation.benchmarks import (
    BenchmarkSpec,
    Problem,
    load_problems,
    resolve_benchmarks,
)
from qmath_megatron.evaluation.config import EvalJob, EvalModelConfig
from qmath_megatron.evaluation.prompts import build_prompt, chat_stop_token_ids
from qmath_megatron.evaluation.scoring import (
    RewardScorer,
    format_table,
    read_samples,
    score_records,
)
from qmath_megatron.evaluation.tir import run_tir
from qmath_megatron.inference.engine import (
    GenerationEngine,
    SamplingParams,
    make_engine,
    resolve_engine_backend,
)
from qmath_megatron.inference.progress import Progress
from qmath_megatron.rewards import AnswerChecker, Convention
from qmath_megatron.sandbox import SandboxExecutor
from qmath_megatron.tokenizer.qwen import load_tokenizer

Log = Callable[[str], None]
_SOURCE_MARKER = "qmath_eval_source.json"


def _log(msg: str) -> None:
    print(msg, flush=True)


def write_json(path: Path, data: object) -> None:
    """Write by rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def check_model(cfg: EvalModelConfig) -> Path | None:
    """Fail early on a bad ``--model``: None for an HF directory, the iteration directory
    of a Megatron checkpoint (which then needs ``--tokenizer``)."""
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {cfg.tokenizer}")
    if (path / "config.json").is_file():
        return None
    try:
        iter_dir, _ = resolve_checkpoint(path)
    except CheckpointError:
        raise ValueError(
            f"{path} is neither a Hugging Face model directory (no config.json) nor a qmath "
            "Megatron checkpoint (no latest_checkpointed_iteration.txt / qmath_model.json)"
        ) from None
    if cfg.tokenizer is None:
        raise ValueError(
            f"{path} is a Megatron checkpoint, which holds no tokenizer: pass --tokenizer DIR"
        )
    return iter_dir


def resolve_model(cfg: EvalModelConfig, out_dir: Path, log: Log = _log) -> tuple[Path, Path]:
    """(HF model directory, tokenizer directory). A Megatron checkpoint is exported to
    ``OUT/hf_model`` once (reused while the checkpoint is unchanged)."""
    path = Path(cfg.path)
    iter_dir = check_model(cfg)
    if iter_dir is None:
        return path, Path(cfg.tokenizer) if cfg.tokenizer else path
    assert cfg.tokenizer is not None  # check_model refuses a checkpoint without one
    hf_dir = out_dir / "hf_model"
    source = {
        "checkpoint": str(iter_dir.resolve()),
        "modified_ns": max(f.stat().st_mtime_ns for f in iter_dir.iterdir()),
        "tokenizer": str(Path(cfg.tokenizer).resolve()),
    }
    marker = hf_dir / _SOURCE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        log(f"reusing the HF export of {iter_dir} in {hf_dir}")
    else:
        log(f"exporting Megatron checkpoint {iter_dir} -> {hf_dir} (qmath convert mcore-to-hf)")
        mcore_to_hf(path, hf_dir, tokenizer=cfg.tokenizer, overwrite=True)
        write_json(marker, source)
    return hf_dir, hf_dir


def make_eval_engine(
    cfg: EvalModelConfig, model_dir: Path, tokenizer_dir: Path
) -> GenerationEngine:
    backend = resolve_engine_backend(cfg.engine)
    if backend == "vllm":
        extra = {"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}
        return make_engine(
            model_dir,
            backend,
            tokenizer=str(tokenizer_dir),
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            **extra,
        )
    return make_engine(
        model_dir, backend, tokenizer=tokenizer_dir, batch_size=cfg.batch_size, dtype=cfg.dtype
    )


class Generator:
    """Generates the completions of one benchmark/mode: CoT samples or TIR trajectories.

    ``chunk_size`` prompts go to the engine per call, with a progress line after each; None
    sends all of them at once (vLLM schedules its own batches and shows its own progress).
    """

    def __init__(
        self,
        engine: GenerationEngine,
        job: EvalJob,
        stop_token_ids: tuple[int, ...],
        executor=None,
        log: Log = _log,
        chunk_size: int | None = None,
    ):
        self.engine, self.job, self.executor, self.log = engine, job, executor, log
        self.chunk_size = chunk_size
        self.params = job.sampling.params(stop_token_ids=stop_token_ids)
        self.greedy_params = replace(self.params, n=1, temperature=0.0, top_p=1.0)

    def _run(self, prompts: list[str], mode: str, params: SamplingParams) -> list[list[dict]]:
        if mode == "cot":
            return [
                [
                    {"text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.token_ids)}
                    for c in group
                ]
                for group in self.engine.generate(prompts, params)
            ]
        if self.executor is None:
            raise ValueError("TIR evaluation needs a sandbox executor")
        return [
            [
                {
                    "text": t.text,
                    "finish_reason": t.finish_reason,
                    "tokens": t.generated_tokens,
                    "executions": [asdict(e) for e in t.executions],
                }
                for t in group
            ]
            for group in run_tir(
                self.engine, prompts, params, self.executor, self.job.tir, self.log
            )
        ]

    def generate(self, prompts: list[str], mode: str) -> tuple[list[list[dict]], list[dict] | None]:
        """(samples [P][n], greedy [P] or None) with progress lines per chunk."""
        chunk = self.chunk_size or max(1, len(prompts))
        samples: list[list[dict]] = []
        greedy: list[dict] | None = (
            [] if self.params.temperature > 0 and self.job.sampling.greedy else None
        )
        progress = Progress(len(prompts), "problems", label="  generated ", log=self.log)
        for lo in range(0, len(prompts), chunk):
            part = prompts[lo : lo + chunk]
            samples += self._run(part, mode, self.params)
            if greedy is not None:
                greedy += [g[0] for g in self._run(part, mode, self.greedy_params)]
            progress.update(lo + len(part), force=True)
        return samples, greedy


def _content_print(path: str) -> dict | None:
    """Content fingerprint of a model directory or benchmark file (data/shards.py's, the
    one the data tools use; large weight files by size, mtime and head/tail hash, so this
    stays cheap): a model or benchmark replaced under the same path is not reused."""
    return path_fingerprint(path) if Path(path).exists() else None


def _fingerprint(job: EvalJob, spec: BenchmarkSpec, mode: str) -> dict:
    """What the saved samples of one benchmark/mode depend on."""
    return {
        "model": str(Path(job.model.path).resolve()),
        "model_files": _content_print(job.model.path),
        "benchmark": asdict(spec),
        "benchmark_file": _content_print(spec.path),
        "mode": mode,
        "limit": job.limit,
        "sampling": asdict(job.sampling),
        "tir": asdict(job.tir) if mode == "tir" else None,
    }


def _records(
    problems: list[Problem], spec: BenchmarkSpec, mode: str, samples, greedy, rm
) -> list[dict]:
    """Sample records (the `qmath eval metrics` format plus generation details)."""
    rows = []
    for p, (prob, group) in enumerate(zip(problems, samples, strict=True)):
        row = {
            "id": prob.id,
            "benchmark": spec.name,
            "mode": mode,
            "problem": prob.problem,
            "gt": prob.reference,
            "completions": [c["text"] for c in group],
        }
        if greedy is not None:
            row["greedy"] = greedy[p]["text"]
        if rm is not None:
            row["rm_scores"] = [float(x) for x in rm[p]]
        row["finish_reasons"] = [c["finish_reason"] for c in group]
        row["generated_tokens"] = [c["tokens"] for c in group]
        if mode == "tir":
            row["executions"] = [c["executions"] for c in group]
        rows.append({**row, **prob.extra})
    return rows


class EvalSession:
    """The expensive pieces of a run (engine, tokenizer, sandbox, answer checkers), built on
    first use so that re-scoring saved samples loads no model."""

    def __init__(
        self,
        job: EvalJob,
        out: Path,
        engine=None,
        tokenizer=None,
        executor=None,
        scorer: RewardScorer | None = None,
        log: Log = _log,
    ):
        self.job, self.out, self.log, self.scorer = job, out, log, scorer
        self.engine, self.tokenizer, self.executor = engine, tokenizer, executor
        self.own_executor = False
        self.model_dir = self.tok_dir = Path(job.model.path)
        self.generator: Generator | None = None
        self.checkers: dict = {}

    def _generator(self) -> Generator:
        if self.generator is None:
            if self.engine is None or self.tokenizer is None:
                self.model_dir, self.tok_dir = resolve_model(self.job.model, self.out, self.log)
            if self.tokenizer is None:
                self.tokenizer = load_tokenizer(self.tok_dir)
            # The resolved backend, not the --engine flag: "auto" is vLLM on a GPU machine.
            chunk_size: int | None = self.job.model.batch_size * 4
            if self.engine is None:
                backend = resolve_engine_backend(self.job.model.engine)
                self.log(f"loading the {backend} engine for {self.model_dir}")
                self.engine = make_eval_engine(self.job.model, self.model_dir, self.tok_dir)
                chunk_size = None if backend == "vllm" else chunk_size
            if self.executor is None and "tir" in self.job.modes:
                self.executor, self.own_executor = SandboxExecutor(self.job.sandbox), True
                self.log(f"sandbox: {self.executor.isolation.backend} isolation")
            stop_ids = chat_stop_token_ids(self.tokenizer)
            self.generator = Generator(
                self.engine, self.job, stop_ids, self.executor, self.log, chunk_size
            )
        return self.generator

    def samples(self, spec: BenchmarkSpec, mode: str, problems: list[Problem]) -> list[dict]:
        """Sample records of one benchmark/mode: reused when saved with the same settings."""
        run_dir = self.out / spec.name / mode
        run_dir.mkdir(parents=True, exist_ok=True)
        samples_path, fp_path = run_dir / "samples.jsonl", run_dir / "generation.json"
        fingerprint = _fingerprint(self.job, spec, mode)
        if samples_path.is_file() and fp_path.is_file() and not self.job.overwrite:
            old = json.loads(fp_path.read_text())
            if old != fingerprint:
                changes = "; ".join(settings_changes(old, fingerprint)[:4])
                raise ValueError(
                    f"{samples_path} was generated with other settings ({changes}); pass "
                    "--overwrite to regenerate or choose another --output"
                )
            self.log(f"[{spec.name}/{mode}] reusing {samples_path}")
            records = read_samples(samples_path)
            if self.scorer is not None and any("rm_scores" not in r for r in records):
                # Saved without a reward model (`qmath eval --rm` later): score them now.
                rm = self.scorer.score(
                    [r["problem"] for r in records], [r["completions"] for r in records]
                )
                records = [
                    {**r, "rm_scores": [float(x) for x in s]}
                    for r, s in zip(records, rm, strict=True)
                ]
                write_jsonl(samples_path, records)
            return records
        generator = self._generator()
        self.log(f"[{spec.name}/{mode}] {len(problems)} problems x {self.job.sampling.n} samples")
        prompts = [build_prompt(self.tokenizer, p.problem, mode) for p in problems]
        samples, greedy = generator.generate(prompts, mode)
        rm = None
        if self.scorer is not None:
            rm = self.scorer.score(
                [p.problem for p in problems], [[c["text"] for c in g] for g in samples]
            )
        records = _records(problems, spec, mode, samples, greedy, rm)
        write_jsonl(samples_path, records)
        write_json(fp_path, fingerprint)
        return records

    def checker(self, percent: str):
        """One answer-checking pool per percent convention."""
        if percent not in self.checkers:
            c = self.job.check
            self.checkers[percent] = AnswerChecker(
                c.workers, c.timeout_s, Convention(percent=percent)
            )
        return self.checkers[percent]

    def close(self) -> None:
        for checker in self.checkers.values():
            checker.close()
        if self.own_executor:
            self.executor.close()


def run_eval(
    job: EvalJob,
    *,
    engine: GenerationEngine | None = None,
    tokenizer=None,
    executor=None,
    scorer: RewardScorer | None = None,
    log: Log = _log,
) -> dict:
    """Evaluate ``job``; returns the summary also written to ``OUT/summary.json``.

    ``engine``, ``tokenizer``, ``executor`` and ``scorer`` can be injected (tests, RL
    evaluation with an engine that is already loaded); otherwise they are built from the job.
    """
    # Bad input fails before anything is written: benchmarks, every problem, the model.
    specs = resolve_benchmarks(job.benchmarks, job.benchmark_dir, job.benchmark_specs)
    problems = {s.name: load_problems(s, job.limit) for s in specs}
    if engine is None:
        check_model(job.model)
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", job.to_dict())
    session = EvalSession(job, out, engine, tokenizer, executor, scorer, log)
    results: dict[str, dict] = {}
    k = job.k
    try:
        for spec in specs:
            for mode in job.modes:
                name, run_dir = f"{spec.name}/{mode}", out / spec.name / mode
                records = session.samples(spec, mode, problems[spec.name])
                metrics, details, k = score_records(records, job.k, session.checker(spec.percent))
                write_json(run_dir / "metrics.json", metrics)
                write_jsonl(run_dir / "scored.jsonl", details)
                results[name] = metrics
                log(
                    f"[{name}] "
                    + ", ".join(f"{m} {v:.1f}" for m, v in metrics.items() if v is not None)
                )
        checks = {p: dict(c.stats) for p, c in session.checkers.items()}
    finally:
        session.close()
    log("\n" + format_table(results, k or 1))
    isolation = getattr(session.executor, "isolation", None)
    summary = {
        "results": results,
        "k": k,
        "model": job.model.path,
        "answer_checks": checks,
        "sandbox": asdict(isolation) if isolation is not None else None,
    }
    write_json(out / "summary.json", summary)
    log(
        f"outputs in {out}/ (summary.json; "
        "<benchmark>/<mode>/samples.jsonl, metrics.json, scored.jsonl)"
    )
    return summary

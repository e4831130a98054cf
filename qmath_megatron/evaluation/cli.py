"""``qmath eval`` (generate + score on benchmarks) and ``qmath eval metrics`` (re-score).

``qmath eval``'s flags map onto the :class:`~qmath_megatron.evaluation.config.EvalJob` (and
``--config FILE.yaml`` / ``key=value`` set any of its keys, e.g. ``sampling.n=4``); see
:mod:`qmath_megatron.config.cli`. Engines, the runner and the scorers are imported inside
the run functions, so that ``--help`` does not import torch or vLLM.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qmath_megatron.config.cli import ConfigArgs, build_config
from qmath_megatron.evaluation.config import RM_ENGINES, CheckConfig, EvalJob
from qmath_megatron.sandbox.config import ISOLATION_MODES
from qmath_megatron.utils.run_summary import format_run_summary, print_run_summary


@dataclass
class MetricsConfig:
    """``qmath eval metrics``: re-score a samples JSONL (no model)."""

    samples: str  # one JSON object per problem: gt, completions, optional rm_scores, greedy
    k: int | None = None  # metrics@k (default: the number of completions)
    output: str | None = None  # the metrics as one JSON object
    details: str | None = None  # per-completion output (default: SAMPLES.scored.jsonl)
    percent: Literal["as_number", "either"] = "as_number"  # whether x% also equals x/100
    check: CheckConfig = field(default_factory=CheckConfig)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _complete_job(data: dict[str, Any]) -> None:
    """A benchmark defined by ``--benchmark name=...`` is also evaluated; ``--model`` is
    needed (said before the rest of the job is checked)."""
    model = data.get("model")
    if not (model.get("path") if isinstance(model, dict) else model):
        raise ValueError(
            "qmath eval needs --model (a Hugging Face directory or Megatron checkpoint)"
        )
    names = list(data.get("benchmarks") or [])
    for spec in data.get("benchmark_specs") or []:
        name = spec.split("name=", 1)[1].split(",", 1)[0] if "name=" in spec else None
        if name and name not in names:
            names.append(name)
    data["benchmarks"] = names


def run_eval_command(args: argparse.Namespace) -> int:
    job = build_config(args)  # settings errors before the runner's imports (torch)
    from qmath_megatron.evaluation.runner import run_eval

    scorer = None
    rm = job.rm
    if rm.path:  # rm@k: the reward model scores every completion (qmath_megatron.reward_model)
        from qmath_megatron.reward_model.scoring import load_scorer

        own = (Path(rm.path) / "tokenizer.json").is_file()  # an HF RM dir with its tokenizer
        tokenizer = rm.tokenizer or (None if own else job.model.tokenizer)
        scorer = load_scorer(rm.path, tokenizer, batch_size=rm.batch_size, engine=rm.engine)
    summary = run_eval(job, scorer=scorer)
    print_run_summary(eval_summary(job, summary))
    return 0


def eval_summary(job: EvalJob, summary: dict) -> str:
    """Outputs, each benchmark/mode's metrics (percent) and the re-scoring command."""
    out = str(job.output).rstrip("/")
    results = summary.get("results") or {}
    metrics = {
        name: ", ".join(f"{m} {v:.1f}" for m, v in values.items() if v is not None)
        for name, values in results.items()
    }
    first = next(iter(results), None)
    rescore = (
        shlex.join(["qmath", "eval", "metrics", "--samples", f"{out}/{first}/samples.jsonl"])
        if first
        else None
    )
    return format_run_summary(
        f"done: eval of {summary.get('model') or job.model.path} (k={summary.get('k')})",
        {"summary": f"{out}/summary.json", "samples": f"{out}/<benchmark>/<mode>/samples.jsonl"},
        metrics,
        rescore,  # metrics@k of other k, another answer convention: no generation
    )


def run_metrics_command(args: argparse.Namespace) -> int:
    from qmath_megatron.evaluation.runner import write_json, write_jsonl
    from qmath_megatron.evaluation.scoring import format_table, read_samples, score_records
    from qmath_megatron.rewards import AnswerChecker, Convention

    cfg = build_config(args)
    records = read_samples(cfg.samples)
    with AnswerChecker(
        cfg.check.workers, cfg.check.timeout_s, Convention(percent=cfg.percent)
    ) as checker:
        metrics, details, k = score_records(records, cfg.k, checker)
        stats = dict(checker.stats)
    samples = Path(cfg.samples)
    details_path = (
        Path(cfg.details)
        if cfg.details
        else samples.with_name(samples.name.removesuffix(".jsonl") + ".scored.jsonl")
    )
    write_jsonl(details_path, details)
    if cfg.output:
        write_json(Path(cfg.output), metrics)
    print(format_table({samples.name: metrics}, k))
    print(json.dumps(metrics))
    failed = {key: stats[key] for key in ("timeouts", "crashes", "errors") if stats.get(key)}
    print(
        f"{len(records)} problems, k={k}; {stats.get('checks', 0)} answer checks"
        + (
            f" ({', '.join(f'{v} {n}' for n, v in failed.items())}, scored as wrong)"
            if failed
            else ""
        )
        + f"; per-completion answers and correctness in {details_path}"
        + (f"; metrics in {cfg.output}" if cfg.output else "")
    )
    return 0


def _add_check_args(a: ConfigArgs) -> None:
    a.add("check.workers", "--check-workers", help="answer-checking processes")
    a.add(
        "check.timeout_s",
        "--check-timeout",
        help="hard wall-clock seconds per answer check; a hang scores as wrong",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on math benchmarks (CoT / TIR; greedy, pass@k, maj@k, rm@k)",
        description="Generate on benchmarks with the Qwen2.5-Math prompts, score the answers "
        "and print greedy / pass@k / maj@k / rm@k. `qmath eval metrics` re-scores saved samples.",
    )
    a = ConfigArgs(p, EvalJob, prepare=_complete_job)
    a.add("model.path", "--model", help="Hugging Face model directory or qmath Megatron checkpoint")
    a.add("model.tokenizer", help="tokenizer directory (needed for a Megatron checkpoint)")
    a.add(
        "benchmarks",
        convert=_csv,
        help="comma-separated names: gsm8k, math500, or ones from --benchmark",
    )
    a.add(
        "benchmark_specs",
        "--benchmark",
        action="append",
        metavar="SPEC",
        help="define a benchmark: name=N,path=F.jsonl,problem=KEY,answer=KEY"
        "[,format=plain|gsm8k|boxed][,id=KEY][,percent=as_number|either]",
    )
    a.add(
        "benchmark_dir",
        help="directory with gsm8k/test.jsonl and math500/test.jsonl "
        "(default: $QMATH_BENCHMARK_DIR)",
    )
    a.add("modes", convert=_csv, help="comma-separated: cot, tir (default cot)")
    a.add("output", help="output directory (default eval_out)")
    a.add("limit", help="evaluate only the first N problems of each benchmark")
    a.add("sampling.n", help="samples per problem (default 1: greedy only)")
    a.add("sampling.temperature")
    a.add("sampling.top_p")
    a.add("sampling.max_new_tokens", help="per generation call / TIR round")
    a.add("sampling.seed")
    a.add(
        "sampling.greedy",
        "--no-greedy",
        negate=True,
        help="with --temperature > 0, skip the extra greedy pass (greedy = first sample)",
    )
    a.add("k", help="metrics@k (default: --n)")
    a.add("model.engine", choices=["auto", "vllm", "transformers"])
    a.add("model.batch_size", help="transformers engine batch size")
    a.add("model.dtype", help="transformers engine dtype")
    a.add("model.tensor_parallel_size", help="vLLM")
    a.add("model.gpu_memory_utilization", help="vLLM")
    a.add("model.max_model_len", help="vLLM")
    a.add("tir.max_executions", "--tir-max-executions")
    a.add("sandbox.timeout_s", "--sandbox-timeout", help="seconds per TIR program")
    a.add("sandbox.memory_mb", "--sandbox-memory-mb")
    a.add("sandbox.workers", "--sandbox-workers", help="TIR programs run in parallel")
    a.add("sandbox.isolation", "--sandbox-isolation", choices=list(ISOLATION_MODES))
    a.add(
        "sandbox.require_strong",
        "--require-strong-sandbox",
        help="refuse to run TIR when only weak (rlimits) isolation is available",
    )
    a.add("overwrite", help="regenerate finished benchmark/modes")
    a.add(
        "rm.path",
        "--rm",
        help="reward model (HF Qwen2ForRewardModel dir or Megatron RM checkpoint) for rm@k",
    )
    a.add(
        "rm.tokenizer",
        "--rm-tokenizer",
        help="tokenizer of --rm (default: --rm's own, else --tokenizer)",
    )
    a.add("rm.batch_size", "--rm-batch-size", help="sequences per reward-model pass")
    a.add(
        "rm.engine",
        "--rm-engine",
        choices=list(RM_ENGINES),
        help="HF --rm: plain PyTorch (default) or vLLM's Qwen2ForRewardModel",
    )
    _add_check_args(a)
    a.finish()
    p.set_defaults(func=run_eval_command)

    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    m = sub.add_parser(
        "metrics",
        prog=f"{p.prog} metrics",  # not "qmath eval [KEY=VALUE ...] metrics"
        help="recompute greedy / pass@k / maj@k / rm@k from a samples JSONL (no model)",
        description="One JSON object per problem: gt, completions (in sampling order), optional "
        "rm_scores and greedy. Writes per-completion answers and correctness.",
    )
    a = ConfigArgs(m, MetricsConfig)
    a.add("samples", required=True, help="samples JSONL")
    a.add("k", help="metrics@k (default: the number of completions)")
    a.add("output", help="write the metrics as one JSON object to this file")
    a.add("details", help="per-completion output (default: SAMPLES.scored.jsonl)")
    a.add(
        "percent",
        choices=["as_number", "either"],
        help="whether x%% also equals x/100 (either) or only x (as_number)",
    )
    _add_check_args(a)
    a.finish()
    m.set_defaults(func=run_metrics_command)

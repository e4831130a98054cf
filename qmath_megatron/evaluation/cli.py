"""``qmath eval`` (generate + score on benchmarks) and ``qmath eval metrics`` (re-score)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _job_from_args(args: argparse.Namespace):
    from qmath_megatron.evaluation.config import (
        CheckConfig,
        EvalJob,
        EvalModelConfig,
        SamplingConfig,
    )
    from qmath_megatron.evaluation.tir import TIRConfig
    from qmath_megatron.sandbox import SandboxConfig

    if not args.model:
        raise ValueError(
            "qmath eval needs --model (a Hugging Face directory or Megatron checkpoint)"
        )
    names = _csv(args.benchmarks) if args.benchmarks else []
    for spec in args.benchmark:
        name = spec.split("name=", 1)[1].split(",", 1)[0] if "name=" in spec else None
        if name and name not in names:
            names.append(name)
    return EvalJob(
        model=EvalModelConfig(
            path=args.model,
            tokenizer=args.tokenizer,
            engine=args.engine,
            batch_size=args.batch_size,
            dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
        ),
        benchmarks=names,
        output=args.output,
        modes=_csv(args.modes),
        benchmark_dir=args.benchmark_dir,
        benchmark_specs=args.benchmark,
        limit=args.limit,
        k=args.k,
        sampling=SamplingConfig(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            greedy=not args.no_greedy,
        ),
        tir=TIRConfig(max_executions=args.tir_max_executions),
        sandbox=SandboxConfig(
            timeout_s=args.sandbox_timeout,
            memory_mb=args.sandbox_memory_mb,
            workers=args.sandbox_workers,
            isolation=args.sandbox_isolation,
            require_strong=args.require_strong_sandbox,
        ),
        check=CheckConfig(workers=args.check_workers, timeout_s=args.check_timeout),
        overwrite=args.overwrite,
    )


def run_eval_command(args: argparse.Namespace) -> int:
    from qmath_megatron.evaluation.runner import run_eval

    job = _job_from_args(args)
    scorer = None
    if args.rm:  # rm@k: the reward model scores every completion (qmath_megatron.reward_model)
        from qmath_megatron.reward_model.scoring import load_scorer

        own = (Path(args.rm) / "tokenizer.json").is_file()  # an HF RM dir with its tokenizer
        tokenizer = args.rm_tokenizer or (None if own else args.tokenizer)
        scorer = load_scorer(
            args.rm, tokenizer, batch_size=args.rm_batch_size, engine=args.rm_engine
        )
    run_eval(job, scorer=scorer)
    return 0


def run_metrics_command(args: argparse.Namespace) -> int:
    from qmath_megatron.evaluation.runner import write_json, write_jsonl
    from qmath_megatron.evaluation.scoring import format_table, read_samples, score_records
    from qmath_megatron.rewards import AnswerChecker, Convention

    records = read_samples(args.samples)
    with AnswerChecker(
        args.check_workers, args.check_timeout, Convention(percent=args.percent)
    ) as checker:
        metrics, details, k = score_records(records, args.k, checker)
        stats = dict(checker.stats)
    samples = Path(args.samples)
    details_path = (
        Path(args.details)
        if args.details
        else samples.with_name(samples.name.removesuffix(".jsonl") + ".scored.jsonl")
    )
    write_jsonl(details_path, details)
    if args.output:
        write_json(Path(args.output), metrics)
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
        + (f"; metrics in {args.output}" if args.output else "")
    )
    return 0


def _add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check-workers", type=int, default=2, help="answer-checking processes")
    p.add_argument(
        "--check-timeout",
        type=float,
        default=10.0,
        help="hard wall-clock seconds per answer check; a hang scores as wrong",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a model on math benchmarks (CoT / TIR; greedy, pass@k, maj@k, rm@k)",
        description="Generate on benchmarks with the Qwen2.5-Math prompts, score the answers "
        "and print greedy / pass@k / maj@k / rm@k. `qmath eval metrics` re-scores saved samples.",
    )
    p.add_argument("--model", help="Hugging Face model directory or qmath Megatron checkpoint")
    p.add_argument("--tokenizer", help="tokenizer directory (needed for a Megatron checkpoint)")
    p.add_argument(
        "--benchmarks", help="comma-separated names: gsm8k, math500, or ones from --benchmark"
    )
    p.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="SPEC",
        help="define a benchmark: name=N,path=F.jsonl,problem=KEY,answer=KEY"
        "[,format=plain|gsm8k|boxed][,id=KEY][,percent=as_number|either]",
    )
    p.add_argument(
        "--benchmark-dir",
        help="directory with gsm8k/test.jsonl and math500/test.jsonl "
        "(default: $QMATH_BENCHMARK_DIR)",
    )
    p.add_argument("--modes", default="cot", help="comma-separated: cot, tir (default cot)")
    p.add_argument("--output", default="eval_out", help="output directory (default eval_out)")
    p.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    p.add_argument("--n", type=int, default=1, help="samples per problem (default 1: greedy only)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument(
        "--max-new-tokens", type=int, default=2048, help="per generation call / TIR round"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-greedy",
        action="store_true",
        help="with --temperature > 0, skip the extra greedy pass (greedy = first sample)",
    )
    p.add_argument("--k", type=int, help="metrics@k (default: --n)")
    p.add_argument("--engine", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--batch-size", type=int, default=8, help="transformers engine batch size")
    p.add_argument("--dtype", default="float32", help="transformers engine dtype")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM")
    p.add_argument("--max-model-len", type=int, help="vLLM")
    p.add_argument("--tir-max-executions", type=int, default=4)
    p.add_argument("--sandbox-timeout", type=float, default=10.0, help="seconds per TIR program")
    p.add_argument("--sandbox-memory-mb", type=int, default=1024)
    p.add_argument("--sandbox-workers", type=int, default=4, help="TIR programs run in parallel")
    p.add_argument("--sandbox-isolation", default="auto", choices=["auto", "bwrap", "rlimits"])
    p.add_argument(
        "--require-strong-sandbox",
        action="store_true",
        help="refuse to run TIR when only weak (rlimits) isolation is available",
    )
    p.add_argument("--overwrite", action="store_true", help="regenerate finished benchmark/modes")
    p.add_argument(
        "--rm", help="reward model (HF Qwen2ForRewardModel dir or Megatron RM checkpoint) for rm@k"
    )
    p.add_argument(
        "--rm-tokenizer", help="tokenizer of --rm (default: --rm's own, else --tokenizer)"
    )
    p.add_argument("--rm-batch-size", type=int, default=8, help="sequences per reward-model pass")
    p.add_argument(
        "--rm-engine",
        default="transformers",
        choices=["transformers", "vllm"],
        help="HF --rm: plain PyTorch (default) or vLLM's Qwen2ForRewardModel",
    )
    _add_check_args(p)
    p.set_defaults(func=run_eval_command)

    sub = p.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    m = sub.add_parser(
        "metrics",
        help="recompute greedy / pass@k / maj@k / rm@k from a samples JSONL (no model)",
        description="One JSON object per problem: gt, completions (in sampling order), optional "
        "rm_scores and greedy. Writes per-completion answers and correctness.",
    )
    m.add_argument("--samples", required=True, help="samples JSONL")
    m.add_argument("--k", type=int, help="metrics@k (default: the number of completions)")
    m.add_argument("--output", help="write the metrics as one JSON object to this file")
    m.add_argument("--details", help="per-completion output (default: SAMPLES.scored.jsonl)")
    m.add_argument(
        "--percent",
        default="as_number",
        choices=["as_number", "either"],
        help="whether x%% also equals x/100 (either) or only x (as_number)",
    )
    _add_check_args(m)
    m.set_defaults(func=run_metrics_command)

"""Peak memory of CPU generation: `qmath eval` and `qmath data rl-prompts` at their defaults.

On a tiny random Qwen2 with the real 151,936-token vocabulary (the vocabulary is what
filled memory: the transformers engine used to keep every step's [rows, vocab] scores and
copy them twice), built here with the Qwen2.5 tokenizer:

  - new:      the tools as they are, at their defaults (eval: batch 8, n 1, greedy,
              --max-new-tokens 2048; rl-prompts: 64 problems a call, batch 8, n 8,
              --max-new-tokens 1024), generation bounded by the model's 1,024 positions;
  - baseline: the same commands with the engine's former `generate` (score history kept,
              no position bound) patched in, at a reduced --max-new-tokens (at the defaults
              it needs 10 GB (eval) and 40 GB (rl-prompts) for the history alone, and was
              killed for memory), and the new engine at the same reduced setting (eval 128,
              rl-prompts 32: the baseline then peaks near 2 and 4 GB).

Each command runs in a fresh process; its peak RSS is the kernel's (wait4 ru_maxrss: the
largest process of the tree, the one holding the model) and the tree's summed RSS is
sampled every 50 ms (answer-checking workers included).

    python bench/generation_memory.py [--workdir /tmp/qmath-genmem] [--problems 8]
        [--eval-baseline-tokens 128] [--rl-baseline-tokens 32] [--skip-defaults]
        [--tools eval,rl-prompts]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from qmath_megatron.inference.engine import SamplingParams, TransformersEngine

VOCAB = 151936


def score_history_generate(
    engine: TransformersEngine, prompts: list, params: SamplingParams
) -> list[list]:
    """The engine's former ``generate``: ``output_scores`` for every step, stacked and
    ``log_softmax``-ed over the whole history, no bound by the model's positions."""
    out = []
    end_ids = tuple(dict.fromkeys([*engine.eos_ids, *params.stop_token_ids]))
    extra = (
        {"stop_strings": list(params.stop), "tokenizer": engine.tokenizer} if params.stop else {}
    )
    torch.manual_seed(params.seed)
    for start in range(0, len(prompts), engine.batch_size):
        batch = prompts[start : start + engine.batch_size]
        enc = engine._pad([engine._ids(p) for p in batch])
        with torch.no_grad():
            gen = engine.model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=params.temperature > 0,
                temperature=params.temperature if params.temperature > 0 else None,
                top_p=params.top_p if params.temperature > 0 else None,
                num_return_sequences=params.n,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=engine.tokenizer.pad_token_id,
                eos_token_id=list(end_ids),
                **extra,
            )
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        logps = torch.stack(gen.scores, dim=1).log_softmax(-1)
        for i in range(len(batch)):
            group = []
            for j in range(params.n):
                row = i * params.n + j
                c = engine._finish(new[row].tolist(), end_ids, params, params.max_new_tokens)
                c.logprobs = [float(logps[row, t, tok]) for t, tok in enumerate(c.token_ids)]
                c.weight_version = engine.weight_version()
                group.append(c)
            out.append(group)
    return out


def child(variant: str, argv: list[str]) -> int:
    """Run ``qmath ARGV`` in this process, with the former engine for ``baseline``."""
    from qmath_megatron.cli import main

    if variant == "baseline":
        TransformersEngine.generate = score_history_generate  # type: ignore[method-assign]
    return main(argv)


def measure(variant: str, argv: list[str], log: Path) -> dict:
    """Peak RSS of ``qmath ARGV`` (largest process, and the tree's sum), and seconds."""
    cmd = [sys.executable, __file__, "--child", variant, "--", *argv]
    start = time.time()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    tree_peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += p.memory_info().rss
                tree_peak = max(tree_peak, total)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} {' '.join(argv[:3])} failed; see {log}")
    return {
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "tree_peak_gb": tree_peak / 1e9,
        "seconds": round(time.time() - start, 1),
    }


def build(work: Path, problems: int) -> tuple[Path, Path]:
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

    model = work / "model"
    if not (model / "model.safetensors").is_file():
        make_random_hf_model(get_flavor("tiny-qwen-vocab"), model, seed=0)
        for f in build_qwen25_tokenizer(work / "tok").iterdir():
            shutil.copy2(f, model / f.name)
    data = work / "problems.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)}) + "\n"
            for i in range(problems)
        )
    )
    return model, data


def eval_args(model: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    spec = f"name=toy,path={data},problem=problem,answer=answer,format=plain"
    return [
        "eval",
        "--model",
        str(model),
        "--engine",
        "transformers",
        "--benchmarks",
        "toy",
        "--benchmark",
        spec,
        "--output",
        str(out),
        "--overwrite",
        *extra,
    ]


def rl_args(model: Path, data: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        "data",
        "rl-prompts",
        "--problems",
        str(data),
        "--model",
        str(model),
        "--output",
        str(out / "kept.jsonl"),
        "--overwrite",
        *extra,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/qmath-genmem")
    ap.add_argument("--problems", type=int, default=8, help="one full engine batch: 8")
    ap.add_argument("--eval-baseline-tokens", type=int, default=128)
    ap.add_argument("--rl-baseline-tokens", type=int, default=32)
    ap.add_argument("--skip-defaults", action="store_true", help="only the baseline pair")
    ap.add_argument("--tools", default="eval,rl-prompts", help="comma-separated")
    ap.add_argument("--child", choices=["new", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.exit(child(args.child, args.argv))

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work, args.problems)
    tools = {
        "eval": (eval_args, 8, 1, 2048, args.eval_baseline_tokens),
        "rl-prompts": (rl_args, 8, 8, 1024, args.rl_baseline_tokens),
    }
    print(f"tiny-qwen-vocab (vocab {VOCAB:,}, 1,024 positions), {args.problems} problems")
    rows = []
    for name in args.tools.split(","):
        make, batch, n, default_tokens, tokens = tools[name]
        runs = []
        if not args.skip_defaults:
            runs.append(("new", "defaults", []))
        reduced = ["--max-new-tokens", str(tokens)]
        runs += [("baseline", f"--max-new-tokens {tokens}", reduced)]
        runs += [("new", f"--max-new-tokens {tokens}", reduced)]
        for variant, setting, extra in runs:
            out = work / f"{name}-{variant}-{len(extra)}"
            r = measure(variant, make(model, data, out, extra), work / f"{out.name}.log")
            rows.append({"tool": name, "variant": variant, "setting": setting, **r})
            print(
                f"{name:10s} {variant:8s} {setting:22s} peak RSS {r['peak_rss_gb']:.2f} GB, "
                f"tree {r['tree_peak_gb']:.2f} GB, {r['seconds']:.0f} s",
                flush=True,
            )
        base, new = (
            next(
                r
                for r in rows
                if r["tool"] == name and r["variant"] == v and r["setting"] != "defaults"
            )
            for v in ("baseline", "new")
        )
        history = batch * n * default_tokens * VOCAB * 4 / 1e9
        print(
            f"{name:10s} at --max-new-tokens {tokens}: baseline / new peak RSS "
            f"{base['peak_rss_gb'] / new['peak_rss_gb']:.2f}x; the baseline's score history "
            f"at the defaults (batch {batch} x n {n} x {default_tokens} steps x vocab x 4 B): "
            f"{history:.2f} GB, held 3 times over (history, stack, log_softmax)",
            flush=True,
        )
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

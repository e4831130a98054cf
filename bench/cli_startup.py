"""Start-up time of the command line: `qmath --help` and a few `qmath <group> <command> --help`.

Each command runs N times as a fresh `python -m qmath_megatron ... --help` process; the
baseline, `python -c pass` (the interpreter's own start-up), runs N times in the same run,
interleaved with the commands so that both see the same machine load. Prints the median
wall time of each, its difference from the baseline (what the CLI's imports and parser
cost) and the ratio, and checks that no command imported torch, megatron, vllm or
transformers (`python -X importtime`).

    python bench/cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (
    [],
    ["data"],
    ["data", "tokenize"],
    ["data", "rft"],
    ["eval"],
    ["train", "grpo"],
    ["convert", "hf-to-mcore"],
    ["exec"],
    ["engine", "serve"],
)
HEAVY = ("torch", "megatron", "vllm", "transformers")


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _heavy_imports(command: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "qmath_megatron", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    return sorted({n.split(".")[0] for n in names} & set(HEAVY))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per command (median)")
    args = parser.parse_args()
    baseline_argv = [sys.executable, "-c", "pass"]
    argvs = {
        " ".join(["qmath", *c, "--help"]): [sys.executable, "-m", "qmath_megatron", *c, "--help"]
        for c in COMMANDS
    }
    times: dict[str, list[float]] = {"baseline: python -c pass": []} | {k: [] for k in argvs}
    for argv in [baseline_argv, *argvs.values()]:
        _time(argv)  # warm-up: page cache, .pyc files
    for _ in range(args.runs):
        times["baseline: python -c pass"].append(_time(baseline_argv))
        for name, argv in argvs.items():
            times[name].append(_time(argv))
    base = statistics.median(times["baseline: python -c pass"])
    print(f"median wall time of {args.runs} runs each ({sys.executable})")
    print(f"{'command':<40} {'median':>9} {'- baseline':>11} {'/ baseline':>11}")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:<40} {med * 1e3:7.0f} ms {(med - base) * 1e3:8.0f} ms {med / base:10.2f}x")
    bad = {" ".join(c) or "(top)": _heavy_imports(c) for c in COMMANDS}
    bad = {k: v for k, v in bad.items() if v}
    print(f"heavy imports ({', '.join(HEAVY)}): {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

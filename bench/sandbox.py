"""What isolation costs per call: the sandboxed executor against a bare subprocess.

TIR evaluation and code-execution rewards run one short program per model turn, so the
fixed cost of a sandboxed call (process chain, namespaces, uid drop, cleanup scan) decides
how many sandbox workers a rollout needs. Measured in one run, same programs, same number
of concurrent calls:

- baseline: ``python -I -B main.py`` in a fresh temporary directory via ``subprocess.run``
  (no isolation at all, no limits), ``--workers`` threads;
- ``SandboxExecutor`` with each available backend (``bwrap``, ``rlimits``).

Programs: ``print(1)`` (pure start-up cost) and a sympy solve (what TIR code looks like).

    python bench/sandbox.py [--calls 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor, SandboxUnavailable

PROGRAMS = {
    "print(1)": "print(1)\n",
    "sympy solve": (
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x))\n"
    ),
}


def bare_call(code: str) -> float:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="bench-bare-")
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        subprocess.run(
            [sys.executable, "-I", "-B", "main.py"],
            cwd=workdir,
            capture_output=True,
            check=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(workdir)
    return time.monotonic() - start


def measure(call, code: str, calls: int, workers: int) -> dict:
    call(code)  # warm the page cache and (for the executor) the slot
    with ThreadPoolExecutor(workers) as pool:
        start = time.monotonic()
        latencies = list(pool.map(lambda _: call(code), range(calls)))
        wall = time.monotonic() - start
    return {
        "calls_per_s": calls / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p90_ms": 1000 * statistics.quantiles(latencies, n=10)[-1],
    }


def sandbox_caller(executor: SandboxExecutor):
    def call(code: str) -> float:
        start = time.monotonic()
        result = executor.run(code)
        if result.status != "ok":
            raise RuntimeError(f"sandboxed call failed: {result.status}: {result.stderr[-500:]}")
        return time.monotonic() - start

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    rows: list[tuple[str, str, dict]] = []
    for program, code in PROGRAMS.items():
        rows.append(
            (
                "bare subprocess (baseline)",
                program,
                measure(bare_call, code, args.calls, args.workers),
            )
        )
    for backend in ("bwrap", "rlimits"):
        config = SandboxConfig(isolation=backend, workers=args.workers, timeout_s=30)
        try:
            executor = SandboxExecutor(config)
        except SandboxUnavailable as exc:
            print(f"{backend}: unavailable ({exc})")
            continue
        with executor:
            label = f"sandbox {backend}" + ("" if executor.isolation.strong else " (weak)")
            for program, code in PROGRAMS.items():
                rows.append(
                    (
                        label,
                        program,
                        measure(sandbox_caller(executor), code, args.calls, args.workers),
                    )
                )

    base = {program: m for label, program, m in rows if label.startswith("bare")}
    print(f"\n{args.calls} calls per row, {args.workers} concurrent, {os.cpu_count()} cores")
    print(
        f"{'executor':<28}{'program':<14}{'calls/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p50 / bare':>12}"
    )
    for label, program, m in rows:
        ratio = m["p50_ms"] / base[program]["p50_ms"]
        print(
            f"{label:<28}{program:<14}{m['calls_per_s']:>9.1f}{m['p50_ms']:>9.0f}{m['p90_ms']:>9.0f}{ratio:>11.2f}x"
        )


if __name__ == "__main__":
    main()

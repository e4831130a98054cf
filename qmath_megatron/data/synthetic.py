"""Generated math text: the project's own small corpus for the demo, tests and benchmarks.

Word problems with worked, step-by-step solutions whose numbers are computed (so every
stated answer is right), in the register of pretraining math text: prose, LaTeX, a final
``\\boxed{}`` answer. Deterministic for a seed. Not a substitute for real data; it exists
so that the pipeline can run end to end offline.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

_NAMES = [
    "Ava",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goro",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
]
_ITEMS = ["apples", "pencils", "marbles", "books", "stickers", "cookies", "coins", "cards"]


def _sum_problem(rng: random.Random) -> str:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(1, 30)
    total = a + b - c
    return (
        f"{name} has {a} {item}. A friend gives {name} {b} more, and then {name} gives away {c}. "
        f"How many {item} does {name} have now?\n\n"
        f"Solution: After receiving {b}, {name} has ${a} + {b} = {a + b}$ {item}. "
        f"Giving away {c} leaves ${a + b} - {c} = {total}$. "
        f"The answer is $\\boxed{{{total}}}$."
    )


def _linear_equation(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "-"
    return (
        f"Solve for $x$: ${a}x {sign} {abs(b)} = {c}$.\n\n"
        f"Solution: {'Subtract' if b >= 0 else 'Add'} {abs(b)} {'from' if b >= 0 else 'to'} both "
        f"sides to get ${a}x = {c - b}$. "
        f"Dividing by {a} gives $x = \\frac{{{c - b}}}{{{a}}} = {x}$. "
        f"Check: ${a} \\cdot ({x}) {sign} {abs(b)} = {c}$. Therefore $x = \\boxed{{{x}}}$."
    )


def _fraction_sum(rng: random.Random) -> str:
    p, q = rng.randint(1, 9), rng.randint(2, 12)
    r, s = rng.randint(1, 9), rng.randint(2, 12)
    total = Fraction(p, q) + Fraction(r, s)
    common = q * s // _gcd(q, s)
    ans = (
        f"\\frac{{{total.numerator}}}{{{total.denominator}}}"
        if total.denominator != 1
        else str(total.numerator)
    )
    return (
        f"Compute $\\frac{{{p}}}{{{q}}} + \\frac{{{r}}}{{{s}}}$ and simplify.\n\n"
        f"Solution: The least common denominator is ${common}$, so the sum is "
        f"$\\frac{{{p * common // q}}}{{{common}}} + \\frac{{{r * common // s}}}{{{common}}} = "
        f"\\frac{{{p * common // q + r * common // s}}}{{{common}}}$, which simplifies to "
        f"$\\boxed{{{ans}}}$."
    )


def _percent_problem(rng: random.Random) -> str:
    price, pct = rng.randint(20, 400), rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    discount = Fraction(price * pct, 100)
    final = price - discount

    def fmt(v: Fraction) -> str:
        return str(v.numerator) if v.denominator == 1 else f"{float(v):.2f}"

    return (
        f"A jacket costs \\${price}. It is on sale for {pct}\\% off. What is the sale price?\n\n"
        f"Solution: The discount is ${pct}\\% \\times {price} = {fmt(discount)}$ dollars, "
        f"so the sale price is ${price} - {fmt(discount)} = {fmt(final)}$ dollars. "
        f"The answer is $\\boxed{{{fmt(final)}}}$."
    )


def _quadratic(rng: random.Random) -> str:
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    b, c = -(r1 + r2), r1 * r2
    lo, hi = sorted((r1, r2))
    term_b = f" {'+' if b >= 0 else '-'} {abs(b)}x" if b else ""
    term_c = f" {'+' if c >= 0 else '-'} {abs(c)}" if c else ""
    return (
        f"Find all real solutions of $x^2{term_b}{term_c} = 0$.\n\n"
        f"Solution: We look for two numbers whose sum is ${-b}$ and whose product is ${c}$: "
        f"they are ${lo}$ and ${hi}$, so $x^2{term_b}{term_c} = (x - ({lo}))(x - ({hi}))$. "
        f"The solutions are $x = \\boxed{{{lo}, {hi}}}$."
        if lo != hi
        else f"Find all real solutions of $x^2{term_b}{term_c} = 0$.\n\nSolution: The left side is "
        f"$(x - ({lo}))^2$, a perfect square, so the only solution is $x = \\boxed{{{lo}}}$."
    )


def _arith_series(rng: random.Random) -> str:
    n = rng.randint(5, 60)
    total = n * (n + 1) // 2
    m = rng.randint(3, 12)
    return (
        f"What is the remainder when $1 + 2 + \\cdots + {n}$ is divided by ${m}$?\n\n"
        f"Solution: By the formula $\\sum_{{k=1}}^{{n}} k = \\frac{{n(n+1)}}{{2}}$, the sum is "
        f"$\\frac{{{n} \\cdot {n + 1}}}{{2}} = {total}$. "
        f"Since ${total} = {m} \\cdot {total // m} + "
        f"{total % m}$, the remainder is $\\boxed{{{total % m}}}$."
    )


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


_GENERATORS: list[Callable[[random.Random], str]] = [
    _sum_problem,
    _linear_equation,
    _fraction_sum,
    _percent_problem,
    _quadratic,
    _arith_series,
]


def generate_documents(n: int, seed: int = 0, problems_per_doc: int = 4) -> Iterator[dict]:
    """``n`` JSON-able documents ``{"id", "text", "source"}``; several problems per document."""
    rng = random.Random(seed)
    for i in range(n):
        parts = [rng.choice(_GENERATORS)(rng) for _ in range(problems_per_doc)]
        yield {
            "id": f"synthetic-{seed}-{i}",
            "text": "\n\n".join(parts),
            "source": "qmath-synthetic",
        }


def _write_rows(path: str | Path, rows: Iterator[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """A generated pretraining corpus (``generate_documents``) as JSONL."""
    return _write_rows(path, generate_documents(n, seed))


def generate_problems(n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` evaluation items ``{"id", "problem", "solution"}``: one generated problem each,
    its worked solution ending in ``\\boxed{answer}`` (read with answer format ``boxed``)."""
    rng = random.Random(seed)
    for i in range(n):
        problem, solution = rng.choice(_GENERATORS)(rng).split("\n\nSolution: ", 1)
        yield {"id": f"synthetic-{seed}-{i}", "problem": problem, "solution": solution}


def write_benchmark_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """A small generated benchmark file for the demo and tests (never the real ones)."""
    return _write_rows(path, generate_problems(n, seed))


# --------------------------------------------------------------------------- the toy domain


def _toy_problem(rng: random.Random) -> tuple[str, int, str]:
    """One toy problem: (problem, answer, worked solution). Sums of two numbers below ten in
    a short question, so a tiny model learns the domain in minutes on a CPU (81 sums) while
    its accuracy still starts near zero."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}. The answer is $\\boxed{{{a + b}}}$."


def generate_toy_problems(n: int, seed: int = 0) -> Iterator[dict]:
    """``n`` toy problems ``{"id", "problem", "answer", "solution"}`` (the pipeline's tiny
    domain: RM, RFT and RL prompts, and held-out evaluation with another seed)."""
    rng = random.Random(seed)
    for i in range(n):
        problem, answer, solution = _toy_problem(rng)
        yield {
            "id": f"toy-{seed}-{i}",
            "problem": problem,
            "answer": str(answer),
            "solution": solution,
        }


def chat_rows(problems: Iterator[dict]) -> Iterator[dict]:
    """Problems with worked solutions as SFT chat rows ``{"id", "messages"}`` (user problem,
    assistant solution; ``sft-prepare`` adds the mode's system prompt)."""
    for row in problems:
        messages = [
            {"role": "user", "content": row["problem"]},
            {"role": "assistant", "content": row["solution"]},
        ]
        yield {"id": row["id"], "messages": messages}


GENERATED_KINDS: dict[str, Callable[[int, int], Iterator[dict]]] = {
    "corpus": generate_documents,
    "problems": generate_problems,
    "sft": lambda n, seed: chat_rows(generate_problems(n, seed)),
    "toy-problems": generate_toy_problems,
    "toy-sft": lambda n, seed: chat_rows(generate_toy_problems(n, seed)),
}


def write_generated(kind: str, path: str | Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of ``kind`` (:data:`GENERATED_KINDS`) to ``path``, written under a
    temporary name and renamed into place (a killed run leaves no partial file)."""
    if kind not in GENERATED_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(GENERATED_KINDS)}")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_rows(tmp, GENERATED_KINDS[kind](n, seed))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

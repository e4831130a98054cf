from __future__ import annotations

import re
from fractions import Fraction

from qmath_megatron.data.synthetic import generate_documents


def test_deterministic_and_distinct():
    a = [d["text"] for d in generate_documents(20, seed=3)]
    assert a == [d["text"] for d in generate_documents(20, seed=3)]
    assert a != [d["text"] for d in generate_documents(20, seed=4)]
    assert len(set(a)) == 20


def test_stated_answers_are_correct():
    """Every linear equation's boxed answer solves it; every remainder is right."""
    checked = 0
    for doc in generate_documents(300, seed=0):
        for m in re.finditer(
            r"Solve for \$x\$: \$(\d+)x ([+-]) (\d+) = (-?\d+)\$.*?\\boxed\{(-?\d+)\}",
            doc["text"],
            re.S,
        ):
            a, sign, b, c, x = m.groups()
            b = int(b) if sign == "+" else -int(b)
            assert int(a) * int(x) + b == int(c)
            checked += 1
        for m in re.finditer(
            r"1 \+ 2 \+ \\cdots \+ (\d+)\$ is divided by \$(\d+)\$.*?\\boxed\{(\d+)\}",
            doc["text"],
            re.S,
        ):
            n, k, r = map(int, m.groups())
            assert n * (n + 1) // 2 % k == r
            checked += 1
        for m in re.finditer(
            r"\\frac\{(\d+)\}\{(\d+)\} \+ \\frac\{(\d+)\}\{(\d+)\}\$ and simplify"
            r".*?\\boxed\{(.*?)\}\$",
            doc["text"],
            re.S,
        ):
            p, q, r, s, ans = m.groups()
            total = Fraction(int(p), int(q)) + Fraction(int(r), int(s))
            frac = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", ans)
            got = Fraction(int(frac[1]), int(frac[2])) if frac else Fraction(int(ans))
            assert got == total
            checked += 1
    assert checked > 200


def test_generated_benchmark_items_have_one_boxed_reference(tmp_path):
    from qmath_megatron.data.synthetic import generate_problems, write_benchmark_jsonl
    from qmath_megatron.evaluation.benchmarks import load_problems, parse_benchmark_spec

    items = list(generate_problems(200, seed=3))
    assert items == list(generate_problems(200, seed=3))  # deterministic per seed
    assert len({i["id"] for i in items}) == 200
    assert all("Solution:" not in i["problem"] and "\\boxed{" in i["solution"] for i in items)
    path = write_benchmark_jsonl(tmp_path / "b.jsonl", 50, seed=3)
    spec = parse_benchmark_spec(
        f"name=s,path={path},problem=problem,answer=solution,format=boxed,id=id"
    )
    problems = load_problems(spec)
    assert [p.id for p in problems] == [i["id"] for i in items[:50]]
    assert all(p.reference and "\\boxed" not in p.reference for p in problems)

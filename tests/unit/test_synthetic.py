from __future__ import annotations

import json
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


def test_toy_problems_are_right_and_reproducible(tmp_path):
    from qmath_megatron.cli import main
    from qmath_megatron.data.synthetic import generate_toy_problems

    rows = list(generate_toy_problems(200, seed=5))
    for r in rows:
        a, b = map(int, re.fullmatch(r"What is (\d) \+ (\d)\?", r["problem"]).groups())
        assert r["answer"] == str(a + b) and r["solution"].endswith(f"\\boxed{{{a + b}}}$.")
    assert rows == list(generate_toy_problems(200, seed=5))
    assert rows != list(generate_toy_problems(200, seed=6))
    out = tmp_path / "toy.jsonl"
    assert main(["data", "generate", "--kind", "toy-sft", "--n", "7", "--output", str(out)]) == 0
    chats = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(chats) == 7 and [m["role"] for m in chats[0]["messages"]] == ["user", "assistant"]
    # An existing file is kept unless --overwrite; no temporary file is left behind.
    assert main(["data", "generate", "--kind", "toy-sft", "--n", "3", "--output", str(out)]) == 1
    assert len(out.read_text().splitlines()) == 7 and sorted(tmp_path.iterdir()) == [out]

"""Decontamination: the Qwen2.5-Math report's three train/test pairs, embedded benchmark
items, same-topic problems left alone, bad lines reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmath_megatron.curation.decontaminate import (
    BenchmarkIndex,
    lcs_length,
    lcs_ratio,
    normalize_words,
)
from qmath_megatron.curation.run_decontaminate import DecontamConfig, decontaminate

# Test-set problems of the three pairs the report shows, and their training near-copies.
TEST_PROBLEMS = [
    "What is the remainder when $1 + 2 + 3 + 4 + \\dots + 9 + 10$ is divided by 9?",
    "For how many integer values of $n$ between 1 and 1000 inclusive does the decimal "
    "representation of $\\frac{n}{1375}$ terminate?",
    "Krista put 1 cent into her new bank on a Sunday morning.  On Monday she put 2 cents "
    "into her bank.  On Tuesday she put 4 cents into her bank, and she continued to double "
    "the amount of money she put into her bank each day for two weeks.  On what day of the "
    "week did the total amount of money in her bank first exceed $\\$5$?",
]
TRAIN_COPIES = [
    "What is the remainder when $1 + 2 + 3 + 4 + \\dots + 9 + 10$ is divided by 8?",
    "For how many integer values of $n$ between 1 and 1000 inclusive does the decimal "
    "representation of $\\frac{n}{1400}$ terminate?",
    "Krista put 1 cent into her new bank on a Sunday morning.  On Monday she put 2 cents "
    "into her bank.  On Tuesday she put 4 cents into her bank, and she continued to double "
    "the amount of money she put into her bank each day for two weeks.  On what day of the "
    "week did the total amount of money in her bank first exceed $\\$2$?",
]
SAME_TOPIC = [
    "Find the remainder of $7^{2023}$ modulo 5 using Fermat's little theorem.",
    "Which fractions $\\frac{k}{250}$ with $1 \\le k \\le 250$ have a repeating decimal expansion?",
    "A savings account triples each month. After how many months does a deposit of 3 dollars "
    "exceed 1000 dollars?",
    "Compute the sum of the first 50 positive odd integers and reduce it modulo 7.",
]


def test_normalization_and_lcs_by_hand():
    assert normalize_words("The $\\frac{n}{1375}$, TERMINATE!") == [
        "the",
        "frac",
        "n",
        "1375",
        "terminate",
    ]
    assert lcs_length(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 3
    assert lcs_ratio(["a", "b", "c", "d", "e"], ["a", "b"]) == pytest.approx(2 / 5)
    assert lcs_ratio([], []) == 0.0


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text(
        "".join(
            json.dumps({"problem": p, "unique_id": f"test/{i}"}) + "\n"
            for i, p in enumerate(TEST_PROBLEMS)
        )
    )
    return path


def test_report_pairs_are_caught_by_lcs(bench_file):
    index = BenchmarkIndex.from_specs([f"{bench_file}:problem"])
    for i, train in enumerate(TRAIN_COPIES):
        match = index.match(train)
        assert match is not None, train
        assert match.item.item_id == f"test/{i}"
        assert match.rule in ("lcs", "ngram13") and match.score >= 0.6
    # The copies happen to share 13-grams too; the LCS rule alone must also catch them
    # (a reworded copy with changed numbers shares none).
    lcs_only = BenchmarkIndex.from_specs([f"{bench_file}:problem"], ngram=10_000)
    for i, train in enumerate(TRAIN_COPIES):
        match = lcs_only.match(train)
        assert match is not None and match.rule == "lcs" and match.item.item_id == f"test/{i}"
        assert 0.9 < match.score < 1.0


def test_same_topic_problems_are_left_alone(bench_file):
    index = BenchmarkIndex.from_specs([f"{bench_file}:problem"])
    assert [index.match(p) for p in SAME_TOPIC] == [None] * len(SAME_TOPIC)


def test_cli_end_to_end_with_math500(tmp_path, shared_dir, bench_file):
    math500 = shared_dir / "benchmarks" / "math500" / "test.jsonl"
    if not math500.is_file():
        pytest.skip("shared MATH-500 not present")
    problems = [json.loads(line) for line in math500.open()]
    long_item = next(p for p in problems if len(normalize_words(p["problem"])) >= 30)
    web = (
        "Welcome to our homework help forum. Today a student asked the following question, "
        "which we discuss at length below with several hints and a full solution. "
    )
    records = [
        {"id": "embedded", "text": web + long_item["problem"] + " Please show your work. " + web},
        *(
            {"id": f"train-{i}", "text": t, "url": "https://example.org"}
            for i, t in enumerate(TRAIN_COPIES)
        ),
        *({"id": f"other-{i}", "text": t} for i, t in enumerate(SAME_TOPIC)),
    ]
    shard = tmp_path / "shard-0.jsonl"
    shard.write_text(
        "".join(json.dumps(r) + "\n" for r in records)
        + "{not json\n"
        + json.dumps({"body": "x"})
        + "\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "data",
            "decontaminate",
            "--input",
            str(shard),
            "--output",
            str(out),
            "--benchmark",
            f"{math500}:problem",
            "--benchmark",
            f"{bench_file}:problem",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    kept = [json.loads(line) for line in (out / "kept" / "shard-0.jsonl").read_text().splitlines()]
    removed = [
        json.loads(line) for line in (out / "removed" / "shard-0.jsonl").read_text().splitlines()
    ]
    assert sorted(r["id"] for r in kept) == sorted(f"other-{i}" for i in range(len(SAME_TOPIC)))
    assert sorted(r["id"] for r in removed) == sorted(
        ["embedded", *(f"train-{i}" for i in range(3))]
    )
    embedded = next(r for r in removed if r["id"] == "embedded")
    assert (
        embedded["decontam_rule"] == "ngram13"
        and embedded["decontam_item"] == long_item["unique_id"]
    )
    assert embedded["decontam_benchmark"] == str(math500)
    assert all(r["url"] == "https://example.org" for r in removed if r["id"].startswith("train"))
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == len(SAME_TOPIC) and report["removed"] == 4
    assert report["rejected"] == {"invalid_json": 1, "missing_text": 1}
    assert {m["item"] for m in report["matched_items"]} >= {long_item["unique_id"]}
    benchmarks = [f"{math500}:problem", f"{bench_file}:problem"]
    rerun = decontaminate(
        DecontamConfig(inputs=[str(shard)], output=str(out), benchmarks=benchmarks)
    )
    assert rerun["resumed_shards"] == 1  # finished shards are skipped
    # Another --benchmark used to reuse the old shards silently: now it is refused.
    with pytest.raises(ValueError, match="setting benchmarks"):
        decontaminate(
            DecontamConfig(inputs=[str(shard)], output=str(out), benchmarks=benchmarks[1:])
        )


def test_bad_benchmark_spec(tmp_path):
    with pytest.raises(ValueError, match="FILE:FIELD"):
        BenchmarkIndex.from_specs(["nofield"])
    with pytest.raises(FileNotFoundError):
        BenchmarkIndex.from_specs([f"{tmp_path}/missing.jsonl:problem"])

"""LLM scoring and synthesis: parsing, prompts, plumbing with a scripted engine, and a
tiny random Qwen2 model through the real transformers engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmath_megatron.curation.llm_steps import (
    EXTRACT_PROMPT,
    REFINE_PROMPT,
    SCORE_PROMPT,
    parse_qa_pairs,
    parse_score,
    score_texts,
    synthesize_texts,
)
from qmath_megatron.inference.engine import Completion, SamplingParams


class ScriptedEngine:
    """Answers each prompt with the first scripted reply whose key occurs in it."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.prompts = replies, []

    def generate(self, prompts, params):
        self.prompts += prompts
        return [[Completion(next(v for k, v in self.replies.items() if k in p))] for p in prompts]


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("Score: 4", 4),
        ("score = 3/5", 3),
        ("**Score:** 5", 5),
        ("2", 2),
        (" 0. ", 0),
        ("Score: 4. Score: 4", 4),
        ("Score: 7", None),
        ("I think 3 or 4", None),
        ("Score: 2 ... actually Score: 4", None),
        ("", None),
        ("The page has 12 equations. Score: 1", 1),
    ],
)
def test_parse_score(answer, expected):
    assert parse_score(answer) == expected


def test_parse_qa_pairs():
    text = "Q: What is 2+2?\nA: 4\nQ: Solve x+1=3.\nA: x = 2,\nbecause 3-1=2.\n"
    assert parse_qa_pairs(text) == [
        ("What is 2+2?", "4"),
        ("Solve x+1=3.", "x = 2,\nbecause 3-1=2."),
    ]
    assert parse_qa_pairs("NONE") == [] and parse_qa_pairs("no pairs here") == []


def test_prompts_are_documented_text():
    assert "0 to 5" in SCORE_PROMPT and "{text}" in SCORE_PROMPT and "Score: N" in SCORE_PROMPT
    assert "Q: <question>" in EXTRACT_PROMPT and "NONE" in EXTRACT_PROMPT
    assert "\\boxed{}" in REFINE_PROMPT.format(question="q", answer="a")


def test_score_plumbing_reports_unparseable():
    engine = ScriptedEngine({"doc-a": "Score: 5", "doc-b": "It is nice.", "doc-c": "Score: 1"})
    results = score_texts(engine, ["doc-a text", "doc-b text", "doc-c text"])
    assert [r.score for r in results] == [5, None, 1] and results[1].raw == "It is nice."
    assert all("Extract:" in p for p in engine.prompts)


def test_synthesize_extracts_then_refines_with_source_ids():
    engine = ScriptedEngine(
        {
            "Rewrite the answer": "Step 1 ... so the answer is \\boxed{4}.",
            "doc-1": "Q: What is 2+2?\nA: 4\nQ: What is 3*3?\nA: 9",
            "doc-2": "NONE",
        }
    )
    records, empty = synthesize_texts(engine, ["doc-1 body", "doc-2 body"], ["id-1", "id-2"])
    assert empty == 1 and [r["source_id"] for r in records] == ["id-1", "id-1"]
    assert records[0] == {
        "source_id": "id-1",
        "question": "What is 2+2?",
        "answer": "Step 1 ... so the answer is \\boxed{4}.",
        "extracted_answer": "4",
    }


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="identical samples"):
        SamplingParams(n=4, temperature=0.0)


def test_transformers_engine_generates_with_logprobs(tiny_instruct):
    from qmath_megatron.inference.engine import TransformersEngine

    engine = TransformersEngine(tiny_instruct, batch_size=2)
    outs = engine.generate(["Hello", "What is 1+1?", "x"], SamplingParams(max_new_tokens=5))
    assert len(outs) == 3 and all(len(o) == 1 for o in outs)
    for (c,) in outs:
        assert len(c.logprobs) == len(c.token_ids) <= 5 and all(lp <= 0 for lp in c.logprobs)
    sampled = engine.generate(
        ["Hello"], SamplingParams(n=3, temperature=1.0, max_new_tokens=4, seed=1)
    )
    assert len(sampled[0]) == 3


def test_score_cli_with_a_tiny_random_model(tiny_instruct, tmp_path):
    docs = [{"id": f"d{i}", "text": f"Document {i}: compute 2+{i}."} for i in range(3)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "data",
            "score",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_instruct),
            "--engine",
            "transformers",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = [
        json.loads(x) for x in (tmp_path / "out" / "scored" / "in.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in scored] == ["d0", "d1", "d2"] and all(
        "quality_score" in r for r in scored
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sum(report["histogram"].values()) == 3
    assert report["unparseable"] == sum(r["quality_score"] is None for r in scored)
    again = subprocess.run(proc.args, capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 0
        and json.loads((tmp_path / "out" / "report.json").read_text())["resumed_shards"] == 1
    )

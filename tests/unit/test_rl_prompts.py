"""`qmath data rl-prompts`: keeps problems solved min..max of n times, every input line in
exactly one output, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qmath_megatron.inference.engine import Completion
from qmath_megatron.rl.prompts import RLPromptsConfig, run_rl_prompts, side_paths


class ScriptedEngine:
    """Answers problem "p<k>" correctly in the first k of its n samples."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append(params)
        out = []
        for prompt in prompts:
            k = int(prompt.split("PROBLEM p")[1].split(" ")[0])
            out.append([Completion(f"The answer is \\boxed{{{7 if j < k else 3}}}.")
                        for j in range(params.n)])  # fmt: skip
        return out


def test_filter_keeps_two_to_five_of_eight(tmp_path, tiny_instruct):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_instruct, local_files_only=True)
    lines = [json.dumps({"problem": f"PROBLEM p{k} end", "answer": "7", "id": k}) for k in range(9)]
    lines += ["{not json", json.dumps({"problem": "PROBLEM p3 end"}), "", json.dumps([1])]
    src = tmp_path / "problems.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rl" / "prompts.jsonl"
    engine = ScriptedEngine(tok)
    r = run_rl_prompts(RLPromptsConfig(problems=str(src), model="unused", output=str(out),
                                       batch_size=4), engine=engine)  # fmt: skip
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    removed_path, rejects_path = side_paths(out)
    removed = [json.loads(x) for x in removed_path.read_text().splitlines()]
    rejects = [json.loads(x) for x in rejects_path.read_text().splitlines()]
    assert [k["id"] for k in kept] == [2, 3, 4, 5]
    assert all(k["rl_correct"] == k["id"] and k["rl_n"] == 8 for k in kept)
    assert {(x["id"], x["reason"]) for x in removed} == {(0, "too_hard"), (1, "too_hard"),
                                                         (6, "too_easy"), (7, "too_easy"), (8, "too_easy")}  # fmt: skip
    assert [x["reason"] for x in rejects] == ["invalid_json", "no_answer", "not_an_object"]
    assert len(kept) + len(removed) + len(rejects) == 12  # every non-blank line, once
    assert r["correct_histogram"] == {k: 1 for k in range(9)}
    assert all(p.n == 8 and p.temperature == 1.0 for p in engine.calls)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_rl_prompts(
            RLPromptsConfig(problems=str(src), model="unused", output=str(out)), engine=engine
        )


def test_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "qmath_megatron", "data", "rl-prompts", *args],
                              capture_output=True, text=True)  # fmt: skip

    r = run(
        "--problems",
        str(tmp_path / "missing.jsonl"),
        "--model",
        "m",
        "--output",
        str(tmp_path / "o.jsonl"),
    )
    assert r.returncode != 0 and "qmath: error: problems file not found" in r.stderr
    with pytest.raises(ValueError, match=r"need 0 <= --min-correct \(6\)"):
        RLPromptsConfig(problems="x", model="m", output="o", min_correct=6)

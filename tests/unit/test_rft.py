"""`qmath data rft` on a scripted engine with known completions: top-k,
distinctness, weighted vote with ties, problems with and without references, TIR, resume,
and the output going through sft-prepare."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmath_megatron.inference.engine import Completion
from qmath_megatron.sft.rft import (
    RFTConfig,
    distinct_top,
    run_rft,
    select_by_vote,
    select_with_reference,
    similarity,
    vote_weights,
    weighted_vote,
)
from qmath_megatron.tokenizer.chat import COT_SYSTEM_PROMPT

# Reasoning paths: A and A2 differ in one word (near-duplicates); B is another derivation.
A = (
    "We add the numbers step by step: first 1 plus 2 gives 3, then 3 plus 3 gives 6. "
    "So the answer is \\boxed{6}."
)
A2 = (
    "We add the numbers step by step: first 1 plus 2 gives 3, then 3 plus 3 gives 6. "
    "Hence the answer is \\boxed{6}."
)
B = "The sum of the first n integers is n(n+1)/2; with n = 3 this is 3*4/2 = 6, so \\boxed{6}."
C = "Multiply instead: 1*2*3 = 6, which is \\boxed{6}."
WRONG = "Adding 1 and 2 and 3 carelessly gives \\boxed{7}."


class ScriptedEngine:
    """Returns the scripted completions of the problem found in each prompt (CoT), in
    order; records every prompt. ``unfinished``: completion texts that hit the length limit."""

    def __init__(self, tokenizer, script: dict[str, list[str]], unfinished: set[str] = frozenset()):
        self.tokenizer, self.script, self.unfinished = tokenizer, script, unfinished
        self.prompts: list[str] = []

    def generate(self, prompts, params):
        self.prompts += prompts
        out = []
        for prompt in prompts:
            (texts,) = [t for p, t in self.script.items() if f"user\n{p}<|im_end|>" in prompt]
            assert len(texts) == params.n and params.temperature > 0
            out.append(
                [
                    Completion(t, [1], None, "length" if t in self.unfinished else "stop")
                    for t in texts
                ]
            )
        return out


class TableScorer:
    """A RewardScorer with a score per response text."""

    def __init__(self, table: dict[str, float]):
        self.table, self.calls = table, 0

    def score(self, problems, completions):
        self.calls += 1
        return [[self.table.get(c, 0.0) for c in group] for group in completions]


@pytest.fixture(scope="module")
def tok(tiny_instruct):
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    return load_tokenizer(tiny_instruct)


@pytest.fixture(scope="module")
def checker():
    from qmath_megatron.rewards import AnswerChecker

    with AnswerChecker(workers=1, timeout_s=20) as c:
        yield c


def test_similarity_and_distinct_top():
    assert similarity(A, A) == 1.0 and similarity(A, A2) >= 0.7 and similarity(A, B) < 0.2
    texts = [A, A2, B, C, WRONG]
    assert distinct_top([0, 1, 2, 3], texts, k=4, max_similarity=0.7) == [0, 2, 3]
    assert distinct_top([1, 0, 2, 3], texts, k=2, max_similarity=0.7) == [1, 2]
    assert distinct_top([0, 1], texts, k=4, max_similarity=1.0) == [
        0,
        1,
    ]  # only exact repeats merge


def test_weighted_vote_and_ties():
    # Unit weights: counts decide; a count tie goes to the class sampled first.
    assert weighted_vote([5, 2, 2, 5, None], [1] * 5) == 5
    assert weighted_vote([5, 2, 2, None], [1] * 4) == 2
    assert weighted_vote([None, None], [1, 1]) is None
    # Weights beat counts; a weight tie goes to more members, then to the first sampled.
    assert weighted_vote([0, 0, 2], [0.3, 0.3, 0.9]) == 2
    assert weighted_vote([0, 0, 2], [0.25, 0.25, 0.5]) == 0
    assert weighted_vote([3, 1], [0.5, 0.5]) == 3
    w = vote_weights([0.0, 100.0, -100.0, math.nan], 4)
    assert w[0] == 0.5 and w[1] == pytest.approx(1.0) and 0 <= w[2] < 1e-20 and w[3] == 0.0


def test_selection_rules():
    texts = [WRONG, A, A2, B, C]
    correct = [False, True, True, True, True]
    finished = [True, True, True, True, False]
    sel = select_with_reference(texts, correct, finished, None, k=4, max_similarity=0.7)
    assert sel.kept == [1, 3]  # A2 near-duplicate of A; C unfinished
    scores = [9.0, 0.1, 2.0, 1.0, 5.0]
    sel = select_with_reference(texts, correct, finished, scores, k=1, max_similarity=0.7)
    assert sel.kept == [2]  # the best-scored correct, finished response
    assert select_with_reference(texts, [False] * 5, finished, None, 4, 0.7).reason == "no_correct"
    classes = [0, 1, 1, 1, None]
    sel = select_by_vote(texts, classes, finished, None, k=4, max_similarity=0.7)
    assert (sel.kept, sel.votes, sel.vote_weight) == ([1, 3], 3, 3.0)
    # With RM scores one confident wrong answer does not outvote three agreeing ones.
    sel = select_by_vote(texts, classes, finished, [8.0, -0.5, -0.5, -0.5, 0.0], 4, 0.7)
    assert sel.voted_label == 1 and sel.kept == [1, 3]


def _problems(path: Path) -> Path:
    rows = [
        {"id": "p-ref", "problem": "What is 1+2+3?", "answer": "6"},
        {"id": "p-frac", "problem": "What is 1/2 as a fraction?", "answer": "\\frac{1}{2}"},
        {"id": "p-vote", "problem": "Compute 2*3."},  # no reference: vote
        {"id": "p-tie", "problem": "Compute 10-4 or 10-3."},  # no reference: tied vote
        {"id": "p-none", "problem": "What is 9-2?", "answer": "7"},  # nothing correct
    ]
    lines = [json.dumps(r) for r in rows[:3]] + ["not json", json.dumps({"text": "no problem key"})]
    lines += [json.dumps(r) for r in rows[3:]]
    path.write_text("\n".join(lines) + "\n")
    return path


SCRIPT = {
    "What is 1+2+3?": [WRONG, A, A2, B, C],
    "What is 1/2 as a fraction?": [
        "It is one half: \\boxed{0.5}",
        "\\boxed{2}",
        "Half, \\boxed{1/2}.",
        WRONG,
        "no answer",
    ],
    "Compute 2*3.": [A, WRONG, B, "2*3 is \\boxed{7}, I think.", C],
    "Compute 10-4 or 10-3.": [
        "\\boxed{7}",
        "\\boxed{6}",
        "so \\boxed{6.0}",
        "so \\boxed{7.0}",
        "none",
    ],
    "What is 9-2?": [A, B, C, "no", "no"],
}


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_reference_solutions_join_the_rm_groups_as_positives(tok, checker, tmp_path):
    problems = tmp_path / "problems.jsonl"
    rows = [
        {"id": "p-none", "problem": "What is 9-2?", "answer": "7", "solution": "9-2 = \\boxed{7}"},
        {"id": "p-ref", "problem": "What is 1+2+3?", "answer": "6", "solution": "  "},
    ]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RFTConfig(
        [str(problems)],
        str(tmp_path / "out"),
        model="scripted",
        n=5,
        k=4,
        reference_solution_key="solution",
    )
    report = run_rft(cfg, engine=ScriptedEngine(tok, SCRIPT), checker=checker, log=lambda m: None)
    groups = {g["problem_id"]: g for g in _read(tmp_path / "out/groups/problems.jsonl")}
    # The unsolved problem's group now has a positive: its reference solution, marked.
    assert [r["correct"] for r in groups["p-none"]["responses"]] == [False] * 5 + [True]
    assert groups["p-none"]["responses"][-1] == {
        "text": "9-2 = \\boxed{7}",
        "correct": True,
        "finished": True,
        "reference": True,
    }
    assert len(groups["p-ref"]["responses"]) == 5  # a blank solution adds nothing
    assert report["reference_responses"] == 1
    # The SFT selection is unchanged: only the policy's own responses are kept.
    kept = _read(tmp_path / "out/sft/problems.jsonl")
    assert [r["problem_id"] for r in kept] == ["p-ref"] * 3
    assert all(r["sample_index"] < 5 for r in kept)


def test_rft_end_to_end_with_scripted_engine(tok, checker, tmp_path):
    problems = _problems(tmp_path / "problems.jsonl")
    out = tmp_path / "rft"
    cfg = RFTConfig([str(problems)], str(out), model="scripted", n=5, k=4)
    engine = ScriptedEngine(tok, SCRIPT)
    report = run_rft(cfg, engine=engine, checker=checker, log=lambda m: None)
    rows = _read(out / "sft" / "problems.jsonl")
    unsolved = _read(out / "unsolved" / "problems.jsonl")
    rejects = _read(out / "rejects" / "problems.jsonl")
    # Every input line ends in exactly one of kept problems / unsolved / rejects.
    kept_problems = {r["problem_id"] for r in rows}
    assert len(kept_problems) + len(unsolved) + len(rejects) == 7
    assert report["problems"] == 5 and report["problems_kept"] == len(kept_problems) == 4
    assert [r["reason"] for r in rejects] == ["invalid_json", "missing_text"]
    by = {p: [r for r in rows if r["problem_id"] == p] for p in kept_problems}
    # Reference: the correct, distinct responses in sample order (A2 duplicates A).
    assert [r["sample_index"] for r in by["p-ref"]] == [1, 3, 4]
    assert all(
        r["correct"] is True and r["voted"] is None and r["reference"] == "6" for r in by["p-ref"]
    )
    # Equivalent forms of the reference count as correct (the shared checker).
    assert [r["sample_index"] for r in by["p-frac"]] == [0, 2]
    # No reference: majority (A, B, C say 6) wins over 7; distinct members kept.
    assert [(r["sample_index"], r["answer"], r["voted"], r["votes"]) for r in by["p-vote"]] == [
        (0, "6", True, 3),
        (2, "6", True, 3),
        (4, "6", True, 3),
    ]
    # Tie 2-2 between 7 (7, 7.0) and 6 (6, 6.0): the class sampled first (7) wins.
    assert [(r["sample_index"], r["answer"]) for r in by["p-tie"]] == [(0, "7"), (3, "7.0")]
    assert unsolved[0]["id"] == "p-none" and unsolved[0]["rft"]["reason"] == "no_correct"
    # Reward-model groups: every problem with a reference, all n responses, verifier labels
    # (the unsolved one too: its wrong responses are negatives).
    groups = {g["problem_id"]: g for g in _read(out / "groups" / "problems.jsonl")}
    assert report["groups"] == len(groups) == 3 and set(groups) == {"p-ref", "p-frac", "p-none"}
    assert [r["correct"] for r in groups["p-frac"]["responses"]] == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert groups["p-ref"]["prompt"] == "What is 1+2+3?" and groups["p-ref"]["reference"] == "6"
    assert [r["text"] for r in groups["p-ref"]["responses"]] == SCRIPT["What is 1+2+3?"]
    # SFT chat records: the evaluation's prompt as messages, the response as the assistant.
    r0 = by["p-ref"][0]
    assert r0["messages"] == [
        {"role": "system", "content": COT_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 1+2+3?"},
        {"role": "assistant", "content": A},
    ]
    assert engine.prompts[0].endswith("What is 1+2+3?<|im_end|>\n<|im_start|>assistant\n")
    # Resume: the same command reuses the done shard; another setting is refused.
    engine.prompts.clear()
    again = run_rft(cfg, engine=engine, checker=checker, log=lambda m: None)
    assert (
        again["resumed_shards"] == 1
        and engine.prompts == []
        and again["responses_kept"] == report["responses_kept"]
    )
    with pytest.raises(ValueError, match="--overwrite"):
        run_rft(
            RFTConfig([str(problems)], str(out), model="scripted", n=5, k=2),
            engine=engine,
            checker=checker,
            log=lambda m: None,
        )
    report_k1 = run_rft(
        RFTConfig([str(problems)], str(out), model="scripted", n=5, k=1, overwrite=True),
        engine=engine,
        checker=checker,
        log=lambda m: None,
    )
    assert report_k1["responses_kept"] == 4  # top-1 of each kept problem


def test_rft_scorer_ranks_and_weighs(tok, checker, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(
        json.dumps({"id": "v", "problem": "Compute 2*3."})
        + "\n"
        + json.dumps({"id": "r", "problem": "What is 1+2+3?", "answer": "6"})
        + "\n"
    )
    # The RM loves the wrong answer "7" of "Compute 2*3." enough to outweigh three votes.
    scorer = TableScorer(
        {"2*3 is \\boxed{7}, I think.": 50.0, WRONG: 50.0, A: -3.0, B: -2.0, C: 1.0, A2: 4.0}
    )
    out = tmp_path / "rft"
    cfg = RFTConfig([str(problems)], str(out), model="scripted", n=5, k=2)
    run_rft(
        cfg, engine=ScriptedEngine(tok, SCRIPT), scorer=scorer, checker=checker, log=lambda m: None
    )
    rows = {(r["problem_id"], r["sample_index"]): r for r in _read(out / "sft" / "p.jsonl")}
    # Vote: class 7 = {WRONG, "2*3 is 7"} weighs ~2.0 > class 6 = sigmoid(-3)+sigmoid(-2)+sigmoid(1)
    assert sorted(k for k in rows if k[0] == "v") == [("v", 1), ("v", 3)]
    assert rows[("v", 1)]["answer"] == "7" and rows[("v", 1)]["vote_weight"] == pytest.approx(2.0)
    # Reference: ranked by score (A2 4.0 > C 1.0 > B -2.0 > A -3.0), k=2, A2's twin A dropped.
    assert [k[1] for k in rows if k[0] == "r"] == [2, 4]
    assert rows[("r", 2)]["score"] == 4.0 and scorer.calls == 1


def test_rft_tir_output_goes_through_sft_prepare(tok, checker, tmp_path):
    from qmath_megatron.sft.dataset import PackedSFTDataset
    from qmath_megatron.sft.prepare import SFTPrepareConfig, prepare_sft

    class TIREngine:
        tokenizer = tok

        def generate(self, prompts, params):
            outs = []
            for prompt in prompts:
                if "```output" in prompt:  # after the sandbox ran the code
                    outs.append(
                        [Completion("The sum is \\boxed{6}.", [1], None, "stop")] * params.n
                    )
                else:
                    code = "Let me compute.\n```python\nprint(1 + 2 + 3)\n```\n"
                    outs.append([Completion(code, [1], None, "stop", "```output")] * params.n)
            return outs

    class Executor:
        def run_many(self, codes):
            return [
                SimpleNamespace(status="ok", stdout="6\n", stderr="", seconds=0.0) for _ in codes
            ]

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "What is 1+2+3?", "answer": "6"}) + "\n")
    out = tmp_path / "rft"
    cfg = RFTConfig([str(problems)], str(out), model="scripted", mode="tir", n=2, k=2)
    report = run_rft(
        cfg, engine=TIREngine(), checker=checker, executor=Executor(), log=lambda m: None
    )
    rows = _read(out / "sft" / "p.jsonl")
    assert report["responses_kept"] == 1  # two identical trajectories: one path
    content = rows[0]["messages"][-1]["content"]
    assert "```output\n6\n```" in content and content.endswith("\\boxed{6}.")
    assert rows[0]["problem_id"] == "p.jsonl:1" and rows[0]["mode"] == "tir"
    prefix = str(tmp_path / "sft")
    rep = prepare_sft(
        SFTPrepareConfig(
            [str(out / "sft" / "p.jsonl")],
            prefix,
            str(tok.name_or_path),
            seq_length=256,
            mode="tir",
        )
    )
    assert rep["samples"] == 1
    seq = PackedSFTDataset(prefix)[0]
    trained = tok.decode([t for t, m in zip(seq.tokens, seq.loss_mask) if m])
    assert "print(1 + 2 + 3)" in trained and "```output" not in trained


def test_rft_cli_with_a_tiny_model(tiny_instruct, tmp_path, capsys):
    from qmath_megatron.cli import main

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    argv = [
        "data",
        "rft",
        "--problems",
        str(problems),
        "--model",
        str(tiny_instruct),
        "--output",
        str(tmp_path / "out"),
        "--n",
        "2",
        "--k",
        "1",
        "--engine",
        "transformers",
        "--max-new-tokens",
        "8",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # A random model answers nothing correctly: the problem is unsolved, nothing lost.
    assert (
        report["problems"],
        report["responses"],
        report["problems_kept"] + report["unsolved"],
    ) == (1, 2, 1)
    assert main([*argv[:-4], "--k", "3", "--engine", "transformers"]) != 0
    assert "1 <= k <= n" in capsys.readouterr().err

"""`qmath rm score` prints progress like the other generating tools: rows done, the rate and
an ETA on stderr (inference/progress.py's format), the output untouched by it."""

from __future__ import annotations

import json
import re

import pytest

from qmath_megatron.cli import main
from tests.tiny_models import make_tiny_hf_rm

ROWS = [{"prompt": f"{i}+1?", "response": f"\\boxed{{{i + 1}}}"} for i in range(3)]
LINE = re.compile(r"^rm score: scored (\d+)/3 rows, \d+s elapsed, [\d.,]+ rows/(s|min), ETA \w+$")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_instruct):

    root = tmp_path_factory.mktemp("rm_progress")
    hf = make_tiny_hf_rm(root / "hf", tiny_instruct, seed=3, max_positions=256)
    return hf


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def test_rm_score_prints_a_progress_line_with_rate_and_eta(rm_dir, src, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rc = main(["rm", "score", "--model", str(rm_dir), "--input", str(src), "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    lines = [m for m in map(LINE.match, captured.err.splitlines()) if m]
    assert lines and lines[-1].group(1) == "3", captured.err  # the final line, always
    assert "rm score:" not in captured.out
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == [
        r["prompt"] for r in ROWS
    ]


def test_score_file_reports_each_batch_as_it_is_scored(rm_dir, src, tmp_path):
    from qmath_megatron.reward_model.scoring import RewardModelScorer, score_file

    lines: list[str] = []
    whole = score_file(RewardModelScorer(rm_dir, batch_size=3), src, tmp_path / "a.jsonl")
    scorer = RewardModelScorer(rm_dir, batch_size=1)
    summary = score_file(scorer, src, tmp_path / "b.jsonl", log=lines.append, progress_every_s=0)
    assert [LINE.match(x).group(1) for x in lines] == ["1", "2", "3"], lines
    assert summary["rows"] == 3
    assert summary["mean_score"] == pytest.approx(whole["mean_score"], abs=1e-5)

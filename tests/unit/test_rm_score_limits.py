"""`qmath rm score` input limits: a row longer than the model's positions is refused before
the model loads (naming the file, line and both lengths) or, with --too-long truncate, cut to
its first positions and counted; a line that is not UTF-8 is one error naming its line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from qmath_megatron.cli import main
from tests.tiny_models import make_tiny_hf_rm

LONG = " ".join(f"step {i}: add one." for i in range(200)) + " \\boxed{200}"


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, tiny_instruct):

    root = tmp_path_factory.mktemp("rm_limits")
    hf = make_tiny_hf_rm(root / "hf", tiny_instruct, seed=7, max_positions=96)
    return hf


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "1+1?", "response": "\\boxed{2}"},
    {"prompt": "Count to 200.", "response": LONG},
    {"prompt": "2*3?", "response": "\\boxed{6}"},
]


def test_a_row_over_the_positions_is_refused_before_the_model_loads(
    rm_dir, tmp_path, monkeypatch, capsys
):
    from qmath_megatron.reward_model.hf import Qwen2RewardModelReference

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the rows were checked")

    monkeypatch.setattr(Qwen2RewardModelReference, "from_pretrained", no_load)
    src = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    rc = main(["rm", "score", "--model", str(rm_dir), "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("qmath: error: ")
    assert f"{src}:2:" in err[0] and "> the model's 96 positions" in err[0]
    n_tokens = int(err[0].split(f"{src}:2: ")[1].split(" tokens")[0])
    assert n_tokens > 96
    assert not out.exists()


def test_truncate_scores_the_first_positions_and_counts_the_row(rm_dir, tmp_path):
    from qmath_megatron.reward_model.rendering import encode_for_rm, rm_messages
    from qmath_megatron.reward_model.scoring import RewardModelScorer, score_file

    src = _write(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    scorer = RewardModelScorer(rm_dir)
    assert scorer.max_positions == 96
    summary = score_file(scorer, src, out, too_long="truncate")
    assert summary["rows"] == 3 and summary["truncated"] == 1
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "response")} for r in scored] == ROWS

    seqs = encode_for_rm(scorer.tokenizer, [rm_messages(r, mode="cot") for r in ROWS])
    assert len(seqs[1]) > 96 >= max(len(seqs[0]), len(seqs[2]))
    expected = scorer.score_ids([seqs[0], seqs[1][:96], seqs[2]])
    assert [r["rm_score"] for r in scored] == pytest.approx(expected, abs=1e-6)


def test_the_limit_applies_to_any_backend_through_max_positions(rm_dir, tmp_path):
    """The Megatron scorer takes max_positions from its checkpoint's flavor; score_file
    checks every backend's sequences the same way before handing them to score_ids."""
    from qmath_megatron.reward_model.scoring import RewardModelScorer, score_file

    tok = RewardModelScorer(rm_dir).tokenizer
    seen: list[list[list[int]]] = []
    stub = SimpleNamespace(
        tokenizer=tok,
        mode="cot",
        max_positions=12,
        score_ids=lambda seqs: seen.append([list(s) for s in seqs]) or [0.0] * len(seqs),
    )
    src = _write(tmp_path / "in.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"in\.jsonl:1: \d+ tokens > the model's 12 positions"):
        score_file(stub, src, tmp_path / "a.jsonl")
    assert not seen
    summary = score_file(stub, src, tmp_path / "b.jsonl", too_long="truncate")
    assert summary["truncated"] == 3
    assert [len(s) for s in seen[0]] == [12, 12, 12]
    with pytest.raises(ValueError, match="unknown --too-long"):
        score_file(stub, src, tmp_path / "c.jsonl", too_long="left")


def test_a_line_that_is_not_utf8_is_one_error_naming_the_line(rm_dir, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{"prompt": "1+1?", "response": "2"}\n{"prompt": "caf\xe9?", "response": "x"}\n'
    )
    out = tmp_path / "out.jsonl"
    rc = main(["rm", "score", "--model", str(rm_dir), "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1
    assert err[0].startswith(f"qmath: error: {src}:2: not UTF-8")
    assert not out.exists()

"""`qmath data rm-prepare`: every line kept, dropped or rejected; groups stay whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qmath_megatron.cli import main


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_instruct):
    return tiny_instruct  # the real Qwen2.5 tokenizer and chat template


def _r(text: str, correct: bool) -> dict:
    return {"text": text, "correct": correct}


LINES = [
    json.dumps({"prompt": "1+1?", "responses": [_r("2", True), _r("3", False), _r("4", False)]}),
    json.dumps({"prompt": "2+2?", "responses": [_r("4", True), _r("4.0", True)]}),  # no negative
    "",  # blank
    "{not json",
    json.dumps(["a list"]),
    json.dumps({"responses": [_r("x", True)]}),  # no prompt
    json.dumps({"prompt": "p", "responses": []}),
    json.dumps({"prompt": "p", "responses": [{"text": "x", "correct": "yes"}]}),
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"},
            ],
            "responses": [_r("6", True), _r("5", False)],
        }
    ),  # prompt ends in assistant
    json.dumps(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "3+3?"},
            ],
            "responses": [_r("5", False), _r("6", True), _r("six", True), _r("7", False)],
        }
    ),
    json.dumps({"prompt": "q", "responses": [_r("no", False), _r("nope", False)]}),  # no positive
    # the only wrong response is too long: dropped as no_negative after its removal
    json.dumps({"prompt": "long", "responses": [_r("ok", True), _r("word " * 400, False)]}),
]


def test_rm_prepare_accounts_for_every_line(tmp_path, tokenizer_dir, capsys):
    from qmath_megatron.reward_model.data import RMGroupDataset
    from qmath_megatron.reward_model.rendering import encode_for_rm, rm_messages
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(LINES) + "\n")
    prefix = tmp_path / "rm"
    argv = [
        "data",
        "rm-prepare",
        "--input",
        str(src),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer_dir),
        "--seq-length",
        "200",
        "--json",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["lines"] == len(LINES)
    assert (report["kept"], report["dropped"], report["rejected"]) == (2, 3, 7)
    assert report["kept"] + report["dropped"] + report["rejected"] == report["lines"]
    assert report["dropped_by_reason"] == {"no_positive": 1, "no_negative": 2}
    assert report["responses_too_long"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "rm.rejects.jsonl").read_text().splitlines()]
    dropped = [json.loads(x) for x in (tmp_path / "rm.dropped.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [3, 4, 5, 6, 7, 8, 9]
    assert {r["reason"] for r in rejects} == {
        "empty",
        "invalid_json",
        "not_an_object",
        "missing_prompt",
        "missing_responses",
        "bad_response",
        "bad_message",
    }
    assert sorted(d["line"] for d in dropped) == [2, 11, 12]
    assert report["rejects"]["empty"] == 1 and sum(report["rejects"].values()) == 7

    ds = RMGroupDataset(prefix)
    assert len(ds) == 2 and ds.max_group_size == 4
    g0, g1 = ds[0], ds[1]
    assert g0.correct.tolist() == [True, False, False]
    assert g1.correct.tolist() == [False, True, True, False]
    # the same token ids as scoring renders them (CoT system prompt for `prompt` rows)
    tok = load_tokenizer(tokenizer_dir)
    expected = encode_for_rm(tok, [rm_messages({"prompt": "1+1?", "response": t}) for t in "234"])
    assert [s.tolist() for s in g0.sequences] == expected
    text = tok.decode(g1.sequences[0].tolist())
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n5<|im_end|>\n")

    with pytest.raises(FileExistsError):
        from qmath_megatron.reward_model.data import RMPrepareConfig, prepare_rm

        prepare_rm(RMPrepareConfig([str(src)], str(prefix), str(tokenizer_dir)))


def test_rm_prepare_refuses_input_without_any_group(tmp_path, tokenizer_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(LINES[1] + "\n")
    argv = [
        "data",
        "rm-prepare",
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "x"),
        "--tokenizer",
        str(tokenizer_dir),
    ]
    assert main(argv) == 1
    assert not (tmp_path / "x.report.json").exists()


def test_microbatches_keep_groups_whole():
    import torch

    from qmath_megatron.reward_model.data import RMGroup
    from qmath_megatron.reward_model.loss import PAD_GROUP
    from qmath_megatron.reward_model.task import group_microbatches

    groups = [
        RMGroup([np.arange(1, n + 2) for n in range(size)], np.array([True] + [False] * (size - 1)))
        for size in (2, 3, 4, 2, 6)
    ]
    mbs = group_microbatches(groups, groups_per_microbatch=2, seq_length=16, pad_id=0)
    assert len(mbs) == 3
    seen = []
    for mb in mbs:
        gids = mb["group_ids"]
        assert (gids >= 0).all()
        # each group's rows are all in this microbatch; ids restart per microbatch
        assert sorted(set(gids.tolist())) == list(range(len(set(gids.tolist()))))
        seen += [int((gids == g).sum()) for g in sorted(set(gids.tolist()))]
        width = -(-int(mb["score_index"].max() + 1) // 8) * 8
        assert mb["tokens"].shape == (len(gids), width)
        assert (mb["tokens"][torch.arange(len(gids)), mb["score_index"]] != 0).all()
    assert seen == [2, 3, 4, 2, 6]
    # pipeline parallelism: one fixed shape, padding rows marked as no group
    fixed = group_microbatches(groups, 2, 16, 0, fixed_rows=12, fixed_width=True)
    assert {tuple(mb["tokens"].shape) for mb in fixed} == {(12, 16)}
    assert [int((mb["group_ids"] == PAD_GROUP).sum()) for mb in fixed] == [7, 6, 6]
    with pytest.raises(ValueError, match="exceed the fixed"):
        group_microbatches(groups, 2, 16, 0, fixed_rows=5)

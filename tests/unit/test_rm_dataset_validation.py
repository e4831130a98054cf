"""An RM dataset whose `.bin` is shorter than its `.idx` is refused when it is opened (at
start-up, as SFT's is), naming the file, not at the step that first reads its end."""

from __future__ import annotations

import json
import os

import pytest

from qmath_megatron.reward_model.data import RMGroupDataset, RMPrepareConfig, prepare_rm


def _r(text: str, correct: bool) -> dict:
    return {"text": text, "correct": correct}


def test_truncated_bin_is_refused_at_open(tmp_path, tiny_instruct):
    src = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "1+1?", "responses": [_r("2", True), _r("3", False)]},
        {"prompt": "2+2?", "responses": [_r("4", True), _r("5", False), _r("6", False)]},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "rm"
    prepare_rm(RMPrepareConfig([str(src)], str(prefix), str(tiny_instruct)))
    assert len(RMGroupDataset(prefix)) == 2  # intact: opens
    bin_ = tmp_path / "rm.bin"
    os.truncate(bin_, bin_.stat().st_size - 4)
    with pytest.raises(ValueError) as err:
        RMGroupDataset(prefix)
    message = str(err.value)
    assert str(bin_) in message and "\n" not in message

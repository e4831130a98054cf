"""`make demo` end to end (shorter): tokenizer, conversion at TP=2, training, export, parity."""

from __future__ import annotations

import json

import pytest

from qmath_megatron.demo import run_demo

pytestmark = pytest.mark.distributed


def test_demo_pipeline(tmp_path):
    summary = run_demo(tmp_path / "demo", steps=8, tp=2, seq=64, batch=4)
    assert summary["tokenizer"]["size"] == 151665
    assert summary["parity_init"]["max_abs_logit_diff"] <= 1e-4
    assert summary["parity_trained"]["max_abs_logit_diff"] <= 1e-4
    assert summary["parity_trained"]["top1_agreement"] == 1.0
    assert summary["train"]["last_loss"] < summary["train"]["first_loss"] - 1.0
    saved = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert saved["train"] == summary["train"]
    # The exported model carries the tokenizer, so `from_pretrained` users get both.
    assert (tmp_path / "demo" / "hf_trained" / "tokenizer.json").is_file()
    assert (
        tmp_path / "demo" / "mcore_trained" / "latest_checkpointed_iteration.txt"
    ).read_text().strip() == "8"

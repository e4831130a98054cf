"""`make demo` end to end (shorter): tokenizer, conversion at TP=2, training, export, parity,
sandbox self-test and `qmath eval` (CoT + TIR) of the exported model."""

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
    # Step 7: the sandbox held against the hostile corpus, and both modes were evaluated.
    ev = summary["eval"]
    assert ev["sandbox_self_test"]["escapes"] == 0 and ev["sandbox_self_test"]["hangs"] == 0
    assert ev["sandbox_self_test"]["attempts"] >= 12
    assert set(ev["results"]) == {"synthetic/cot", "synthetic/tir"}
    for run in ev["results"]:
        rows = [
            json.loads(x)
            for x in (tmp_path / "demo" / "eval" / run / "samples.jsonl").read_text().splitlines()
        ]
        assert len(rows) == ev["problems"] and all(len(r["completions"]) == 2 for r in rows)
        assert (
            json.loads((tmp_path / "demo" / "eval" / run / "metrics.json").read_text())
            == ev["results"][run]
        )

"""`qmath eval --model MEGATRON_CKPT`: the checkpoint (saved at TP=2, converted by gloo
ranks) is exported to HF and evaluated; its greedy completions must equal those of the HF
model it came from, token for token."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed


def test_eval_of_a_megatron_checkpoint_equals_the_hf_model(tiny_instruct, tmp_path):
    from qmath_megatron.convert.commands import hf_to_mcore

    tok = tmp_path / "tok"
    tok.mkdir()
    # The tokenizer files only (the chat template included): a Megatron checkpoint has none.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_instruct / name, tok / name)
    ckpt = tmp_path / "mcore_tp2"
    hf_to_mcore(tiny_instruct, ckpt, tp=2)
    bench = tmp_path / "toy.jsonl"
    bench.write_text(
        "".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(3))
    )
    common = [
        "--benchmark",
        f"name=toy,path={bench},problem=q,answer=a",
        "--engine",
        "transformers",
        "--max-new-tokens",
        "16",
    ]
    runs = {}
    for name, model in [
        ("hf", ["--model", str(tiny_instruct)]),
        ("mcore", ["--model", str(ckpt), "--tokenizer", str(tok)]),
    ]:
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "qmath_megatron", "eval", *model, *common, "--output", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [
            json.loads(x) for x in (out / "toy" / "cot" / "samples.jsonl").read_text().splitlines()
        ]
        runs[name] = rows
    assert (tmp_path / "mcore" / "hf_model" / "config.json").is_file()
    assert [r["completions"] for r in runs["mcore"]] == [r["completions"] for r in runs["hf"]]
    assert [r["generated_tokens"] for r in runs["mcore"]] == [
        r["generated_tokens"] for r in runs["hf"]
    ]
    assert all(len(r["completions"][0]) > 0 for r in runs["hf"])
    # Without --tokenizer a Megatron checkpoint is refused with a clear message.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "eval",
            "--model",
            str(ckpt),
            *common,
            "--output",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "--tokenizer" in proc.stderr

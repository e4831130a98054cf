"""The tiny pipeline recipe end to end (`qmath pipeline run --recipe tiny_cpu`), at test
size: every stage of the loop runs through its real command (generate, tokenizer, CPT,
SFT1, RM samples, RM1, RFT with RM1, SFT2, RM2, RL prompts, GRPO with real vLLM rollouts,
HF exports, evaluation of base / sft1 / sft2 / grpo), then status, report and a rerun that
runs nothing. The worked chain of docs/pipeline.md is this recipe's command list."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qmath_megatron.pipeline.recipes import get_pipeline

pytestmark = pytest.mark.distributed

DOCS = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"

# Test size: a few steps per trainer, a few problems per sampling stage; RL prompts keep
# every problem (a model trained this briefly solves too few for the 2..5-of-8 filter).
SMALL = [
    "toy_sft.n=64",
    "sft1.data.global_batch_size=8",
    "sft2.data.global_batch_size=8",
    "toy_problems.n=8",
    "toy_rm_valid.n=4",
    "toy_heldout.n=4",
    "base.train.train_iters=4",
    "base.data.synthetic_documents=64",
    "sft1.train.train_iters=4",
    "sft2.train.train_iters=4",
    "sft1.scheduler.warmup_iters=1",
    "sft2.scheduler.warmup_iters=1",
    "rm1.train.train_iters=3",
    "rm2.train.train_iters=3",
    "grpo.train.train_iters=2",
    "rl_prompts.min_correct=0",
    "rl_prompts.max_correct=2",
    "rl_prompts.n=2",
    "rm1_samples.n=2",
    "rm2_samples.n=2",
    "rm1_valid_samples.n=2",
    "rm2_valid_samples.n=2",
    "rft.n=2",
    "rft.k=1",
    "grpo.rl.max_new_tokens=8",
]
for _stage in ("rm1_samples", "rm2_samples", "rm1_valid_samples", "rm2_valid_samples", "rft"):
    SMALL.append(f"{_stage}.max_new_tokens=12")
SMALL += [f"eval_{m}.n=2" for m in ("base", "sft1", "sft2", "grpo")]
SMALL += [f"eval_{m}.max_new_tokens=12" for m in ("base", "sft1", "sft2", "grpo")]


def qmath(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmath_megatron", *args], capture_output=True, text=True
    )


def test_tiny_pipeline_runs_every_stage(tmp_path):
    run = tmp_path / "run"
    out = qmath("pipeline", "run", "--recipe", "tiny_cpu", "--workdir", str(run), *SMALL)
    assert out.returncode == 0, out.stderr[-4000:] + out.stdout[-2000:]
    status = json.loads(qmath("pipeline", "status", str(run), "--json").stdout)
    names = [s["name"] for s in status["stages"]]
    assert names == list(get_pipeline("tiny_cpu").stages)
    assert {s["state"] for s in status["stages"]} == {"done"}, status["stages"]
    # Evaluation of every model, with rm@k by the final RM.
    assert set(status["eval"]) == {"base", "sft1", "sft2", "grpo"}
    for model, metrics in status["eval"].items():
        assert set(metrics["toy/cot"]) >= {"greedy", "maj@2", "rm@2"}, model
    by = {s["name"]: s for s in status["stages"]}
    assert by["grpo"]["metrics"]["reward"]["iterations"] == 2
    assert by["rm1"]["metrics"]["loss"]["iterations"] == 3
    # The RM groups are the SFT model's own samples, labelled by the verifier, plus the
    # problem's worked solution as a positive.
    lines = (run / "rm1_samples/out/groups/toy_problems.jsonl").read_text().splitlines()
    groups = [json.loads(g)["responses"] for g in lines]
    assert len(groups) == 8 and all(len(g) == 3 and g[-1]["reference"] for g in groups)
    # GRPO started from SFT2 and rolled out with its export (the recorded command lines).
    argv = {d["name"]: d["argv"] for d in json.loads((run / "pipeline.json").read_text())["dag"]}
    assert f"model.init_from={run / 'sft2/ckpt'}" in argv["grpo"]
    assert f"rl.rm_model={run / 'rm2_hf/hf'}" in argv["grpo"]

    report = qmath("pipeline", "report", str(run))
    assert report.returncode == 0, report.stderr
    for name in ("loss.png", "reward.png", "eval_accuracy.png"):
        png = run / "plots" / name
        assert png.is_file() and png.stat().st_size > 1000, name
    text = (run / "report.md").read_text()
    assert "| grpo |" in text and "![eval_accuracy](plots/eval_accuracy.png)" in text

    # The same command again runs nothing; a changed setting is refused, naming it.
    again = qmath("pipeline", "run", "--recipe", "tiny_cpu", "--workdir", str(run), *SMALL)
    assert again.returncode == 0 and "every stage of" in again.stderr
    changed = [*SMALL[:-1], "eval_grpo.max_new_tokens=16"]
    refused = qmath("pipeline", "run", "--recipe", "tiny_cpu", "--workdir", str(run), *changed)
    assert refused.returncode == 1
    assert "eval_grpo.max_new_tokens: 12 -> 16" in refused.stderr


def test_docs_list_the_tiny_recipe_commands(tmp_path):
    """docs/pipeline.md's worked chain is the tiny recipe's command list (--dry-run)."""
    out = qmath(
        "pipeline", "run", "--recipe", "tiny_cpu", "--workdir", "runs/pipeline", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    planned = [
        re.sub(r"^\S+ -m qmath_megatron ", "qmath ", line).replace(str(Path.cwd()) + "/", "")
        for line in out.stderr.splitlines()
        if " -m qmath_megatron " in line
    ]
    block = DOCS.read_text().split("<!-- tiny_cpu commands -->", 2)[1]
    documented = [x for x in block.splitlines() if x.startswith("qmath ")]
    assert documented == planned

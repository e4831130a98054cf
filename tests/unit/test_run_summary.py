"""The end-of-run summary of trainers and data tools (qmath_megatron/utils/run_summary.py):
outputs, first/last/best metrics or counts, and the next command, in one shape."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qmath_megatron.cli import build_parser, main
from qmath_megatron.utils.run_summary import (
    format_run_summary,
    metric_trend,
    read_records,
)


def summary_block(text: str) -> tuple[str, dict[str, list[str]]]:
    """The title and ``{label: [values]}`` of the last summary block in ``text``."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("qmath: "))
    rows: dict[str, list[str]] = {}
    label = ""
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        head, _, value = line.strip().partition(": ") if ": " in line else ("", "", line)
        label = head or label
        rows.setdefault(label, []).append(value.strip())
    return lines[start], rows


def parses(command: str) -> None:
    """A summary's next command is a real `qmath` command (subcommand and flags exist)."""
    words = shlex.split(command)
    assert words[0] == "qmath", command
    build_parser().parse_args(words[1:])


# ---- the formatter ---------------------------------------------------------------------
def test_trend_is_min_for_losses_and_max_for_rewards():
    records = [
        {"iteration": 1, "loss": 3.0, "reward": 0.1},
        {"iteration": 2, "loss": 1.5, "reward": 0.6},
        {"iteration": 2, "val_loss": 9.0},  # an evaluation record of the same step
        {"iteration": 3, "loss": 2.0, "reward": 0.4, "accuracy": float("nan")},
    ]
    loss = metric_trend(records, "loss")
    assert (loss.first, loss.last, loss.best) == ((1, 3.0), (3, 2.0), (2, 1.5))
    reward = metric_trend(records, "reward", higher_is_better=True)
    assert (reward.first, reward.last, reward.best) == ((1, 0.1), (3, 0.4), (2, 0.6))
    assert str(loss) == "first 3 (it 1) -> last 2 (it 3), best 1.5 (it 2)"
    assert metric_trend(records, "val_loss").first == (2, 9.0)
    assert metric_trend(records, "accuracy") is None  # no finite value
    assert metric_trend(records, "nope") is None


def test_a_resumed_runs_metrics_count_each_iteration_once(tmp_path):
    # The first run logged 1..5 and saved at 3; the resumed run recomputed 4..5 (other
    # values: the later line wins) and went on to 6. A broken line is skipped.
    path = tmp_path / "metrics.jsonl"
    first = [{"iteration": i, "loss": 10.0 - i} for i in range(1, 6)]
    resumed = [{"iteration": i, "loss": 20.0 + i} for i in range(4, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in first) + "{broken\n")
    with path.open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in resumed))
    records = read_records(path)
    assert len(records) == 8
    trend = metric_trend(records, "loss")
    assert (trend.first, trend.last, trend.best) == ((1, 9.0), (6, 26.0), (3, 7.0))
    assert read_records(tmp_path / "missing.jsonl") == []


def test_the_block_aligns_labels_and_leaves_out_none():
    text = format_run_summary(
        "done: x",
        {"checkpoint": "ck (iteration 3)", "tensorboard": None},
        {"kept": 12345, "rate": 0.123456, "lm loss": metric_trend([{"loss": 2.0}], "loss")},
        ["qmath a", "qmath b"],
    )
    assert text.splitlines() == [
        "qmath: done: x",
        "  checkpoint: ck (iteration 3)",
        "  kept:       12,345",
        "  rate:       0.1235",
        "  lm loss:    first 2 (it 1) -> last 2 (it 1), best 2 (it 1)",
        "  next:       qmath a",
        "              qmath b",
    ]
    assert format_run_summary("t", {"a": "b"}).splitlines()[1] == "  a: b"


# ---- trainers --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage", "recipe", "tokenizer", "first_words"),
    [
        ("pretrain", "qwen25_math_7b_cpt", None, "qmath train sft --recipe qwen25_math_7b_sft"),
        ("sft", "tiny_cpu_sft", "tok/", "qmath convert mcore-to-hf --ckpt ck/ --out ck_hf"),
        ("rm", "qwen25_math_rm_72b", None, "qmath convert mcore-to-hf"),
        ("grpo", "qwen25_math_7b_grpo", "tok/", "qmath convert mcore-to-hf"),
    ],
)
def test_next_commands_are_real_commands(stage, recipe, tokenizer, first_words):
    from qmath_megatron.training.cli import next_commands

    commands = next_commands(stage, recipe, "ck/", tokenizer)
    assert commands[0].startswith(first_words), commands
    for command in commands:
        parses(command)
    if tokenizer:
        assert commands[0].endswith(f"--tokenizer {tokenizer}")
    if stage == "rm":
        assert "--recipe qwen25_math_72b_grpo" in commands[1] and "rl.rm_model=ck_hf" in commands[1]
    if stage == "grpo":
        assert commands[1].startswith("qmath eval --model ck_hf")


def test_a_stopped_run_names_its_checkpoint_and_the_command_that_resumes_it(tmp_path):
    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.pretrain.recipes import get_recipe
    from qmath_megatron.training.cli import RunResult, train_summary

    save = tmp_path / "ck"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("12")
    records = [{"iteration": i, "loss": 5.0 - i / 10} for i in range(11, 13)]
    (save / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [{"iteration": 1, "loss": 9.0}, *records])
    )
    command = f"qmath train pretrain --recipe tiny_cpu checkpoint.save={save}"
    run = RunResult(
        stage="pretrain",
        job=apply_overrides(get_recipe("tiny_cpu"), [f"checkpoint.save={save}"]),
        recipe="tiny_cpu",
        history=records,  # this process logged 11..12 only
        start_iteration=10,
        total_iters=30,
        seconds=3.0,
        command=command,
    )
    title, rows = summary_block(train_summary(run))
    assert title == (
        "qmath: stopped: pretrain at iteration 12 of 30, iterations 11-12 (resumed from 10) in 3.0s"
    )
    assert rows["checkpoint"] == [f"{save} (iteration 12)"]
    assert rows["lm loss"] == ["first 9 (it 1) -> last 3.8 (it 12), best 3.8 (it 12)"]
    assert rows["next"] == [command]
    parses(command)


def test_train_prints_the_summary_at_the_end(tmp_path):
    save = tmp_path / "ck"
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "train", "pretrain", "--recipe", "tiny_cpu"]
        + ["train.train_iters=2", "train.eval_interval=2", "scheduler.warmup_iters=1"]
        + [f"checkpoint.save={save}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    title, rows = summary_block(proc.stdout)
    assert title.startswith("qmath: done: pretrain, 2 iterations in "), proc.stdout[-2000:]
    assert rows["checkpoint"] == [f"{save} (iteration 2)"]
    assert rows["metrics"] == [str(save / "metrics.jsonl")]
    losses = [r["loss"] for r in read_records(save / "metrics.jsonl") if "loss" in r]
    assert rows["lm loss"][0].startswith(f"first {losses[0]:.4g} (it 1) -> last {losses[1]:.4g}")
    assert rows["val loss"][0].startswith("first ")
    assert rows["next"] == [
        f"qmath train sft --recipe tiny_cpu_sft model.init_from={save} checkpoint.save={save}_sft"
    ]
    parses(rows["next"][0])


# ---- data tools ------------------------------------------------------------------------
def test_sft_prepare_summary_counts_match_its_report(tiny_instruct, tmp_path, capsys):
    src = tmp_path / "chat.jsonl"
    good = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i}?"},
                {"role": "assistant", "content": f"It is \\boxed{{{2 * i}}}."},
            ]
        }
        for i in range(5)
    ]
    src.write_text("".join(json.dumps(c) + "\n" for c in good) + "not json\n[1]\n")
    prefix = str(tmp_path / "out" / "sft")
    (tmp_path / "out").mkdir()
    argv = ["data", "sft-prepare", "--input", str(src), "--output-prefix", prefix]
    argv += ["--tokenizer", str(tiny_instruct), "--seq-length", "256"]
    assert main(argv) == 0
    report = json.loads(Path(prefix + ".report.json").read_text())
    title, rows = summary_block(capsys.readouterr().out)
    assert title == "qmath: done: data sft-prepare (cot, seq length 256)"
    assert rows["dataset"] == [f"{prefix}.bin/.idx, {prefix}.loss_mask.bin/.idx"]
    assert rows["report"] == [prefix + ".report.json"]
    assert rows["set aside"] == [report["rejects_file"]]
    assert (report["lines"], report["samples"], report["rejected"]) == (7, 5, 2)
    assert rows["lines"] == ["7"] and rows["rejected"] == ["2"]
    assert rows["kept"][0].startswith(f"5 samples in {report['sequences']} packed sequences")
    assert f"data.prefix={prefix}" in rows["next"][0]
    parses(rows["next"][0])
    # --json: stdout stays one JSON object, the summary goes to stderr
    assert main([*argv, "--overwrite", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["samples"] == 5
    assert summary_block(captured.err)[1]["lines"] == ["7"]


def test_dedup_summary_counts_match_its_report(tmp_path, capsys):
    docs = [f"document {i} " + " ".join(f"w{i}_{j}" for j in range(40)) for i in range(8)]
    rows_in = [{"id": i, "text": t} for i, t in enumerate(docs + docs[:3])]  # 3 duplicates
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_in) + "{broken\n")
    out = tmp_path / "o"
    argv = ["data", "dedup", "--input", str(tmp_path / "a.jsonl"), "--output", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    title, rows = summary_block(capsys.readouterr().out)
    assert title == "qmath: done: data dedup"
    assert (report["kept"], report["removed"], report["bad_lines"]) == (8, 3, 1)
    assert rows["kept"] == ["8"] and rows["rejected"] == ["1"]
    assert rows["removed"][0].startswith("3 (in ")
    assert rows["documents"] == [f"{report['documents']:,}"]
    assert rows["outputs"] == [f"{out}/kept/, {out}/removed/, {out}/rejects/"]
    assert rows["report"] == [f"{out}/report.json"]
    assert rows["next"][0].startswith(f"qmath data score --input '{out}/kept/*'")
    parses(rows["next"][0])

"""The post-training data tools (sft-prepare, rm-prepare, rl-prompts, rft) never destroy
earlier outputs or inputs: a failed ``--overwrite`` rerun leaves the old dataset as it was,
an output that is also an input is refused, two runs on one output are refused, a killed
run leaves no worker behind and its partial files are removed by the next run, and a full
disk leaves no temporary file."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qmath_megatron.cli import main
from qmath_megatron.data.shards import OutputLockedError, output_lock
from qmath_megatron.reward_model import data as rm_data
from qmath_megatron.rewards.checker import AnswerChecker
from qmath_megatron.rl.prompts import RLPromptsConfig, output_paths, run_rl_prompts
from qmath_megatron.sft import prepare as sft_prepare
from qmath_megatron.sft.rft import RFTConfig, run_rft
from qmath_megatron.tokenizer.qwen import load_tokenizer
from tests.unit.test_rft import SCRIPT, _problems
from tests.unit.test_rft import ScriptedEngine as RFTEngine
from tests.unit.test_rl_prompts import ExactChecker, ScriptedEngine, _problem


def _conv(i: int, words: int = 3) -> dict:
    return {
        "id": i,
        "messages": [
            {"role": "user", "content": f"Problem {i}?"},
            {"role": "assistant", "content": " ".join(["step"] * words) + f" {i}"},
        ],
    }


def _write_convs(path: Path, n: int, words: int = 3) -> Path:
    path.write_text("".join(json.dumps(_conv(i, words)) + "\n" for i in range(n)))
    return path


def _rm_lines(n: int) -> str:
    group = {"prompt": "1+1?", "responses": [{"text": "2", "correct": True}]}
    group["responses"].append({"text": "3", "correct": False})
    return "".join(json.dumps({**group, "prompt": f"{i}+1?"}) + "\n" for i in range(n))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("qmath: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _sft_argv(src: Path, prefix: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        "data",
        "sft-prepare",
        "--input",
        str(src),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer),
        "--seq-length",
        "128",
        *extra,
    ]


def _rm_argv(src: Path, prefix: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [
        "data",
        "rm-prepare",
        "--input",
        str(src),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer),
        "--seq-length",
        "128",
        *extra,
    ]


# --------------------------------------------------------------------------- --overwrite


def test_sft_prepare_failed_overwrite_keeps_the_old_dataset(
    tiny_instruct, tmp_path, monkeypatch, capsys
):
    src = _write_convs(tmp_path / "in.jsonl", 20)
    out = tmp_path / "out"
    out.mkdir()
    argv = _sft_argv(src, out / "sft", tiny_instruct)
    assert main(argv) == 0
    old = _snapshot(out)
    assert {"sft.bin", "sft.report.json", "sft.rejects.jsonl"} <= set(old)

    # A rebuild that dies after some samples: the old dataset is untouched, nothing is left.
    real_add, calls = sft_prepare._SampleStore.add, []

    def failing_add(self, ids, mask):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("simulated crash mid-run")
        real_add(self, ids, mask)

    monkeypatch.setattr(sft_prepare._SampleStore, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*argv, "--overwrite"])
    assert _snapshot(out) == old
    monkeypatch.undo()

    # A rebuild without any usable sample: refused, the old dataset kept.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    _one_line(capsys, _sft_argv(bad, out / "sft", tiny_instruct, "--overwrite"), "kept")
    assert _snapshot(out) == old

    # A successful rebuild replaces every output.
    _write_convs(src, 7)
    assert main([*argv, "--overwrite"]) == 0
    new = _snapshot(out)
    assert set(new) == set(old) and json.loads(new["sft.report.json"])["samples"] == 7
    assert new["sft.bin"] != old["sft.bin"]


def test_rm_prepare_failed_overwrite_keeps_the_old_dataset(tiny_instruct, tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text(_rm_lines(6))
    out = tmp_path / "out"
    out.mkdir()
    argv = _rm_argv(src, out / "rm", tiny_instruct)
    assert main(argv) == 0
    old = _snapshot(out)
    assert {"rm.bin", "rm.labels.npy", "rm.report.json", "rm.rejects.jsonl"} <= set(old)

    real_add, calls = rm_data._Run.add, []

    def failing_add(self, where):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated crash mid-run")
        real_add(self, where)

    monkeypatch.setattr(rm_data._Run, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*argv, "--overwrite"])
    assert _snapshot(out) == old
    monkeypatch.undo()

    src.write_text(_rm_lines(3))
    assert main([*argv, "--overwrite"]) == 0
    new = _snapshot(out)
    assert set(new) == set(old) and json.loads(new["rm.report.json"])["kept"] == 3


class _FailingEngine(ScriptedEngine):
    def generate(self, prompts, params):
        raise RuntimeError("simulated engine crash")


def test_rl_prompts_failed_overwrite_keeps_the_old_outputs(tmp_path, tiny_instruct):
    tok = load_tokenizer(tiny_instruct)
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(_problem(k, "x")) + "\n" for k in range(9)))
    out = tmp_path / "rl" / "prompts.jsonl"
    cfg = RLPromptsConfig(problems=str(src), model="m", output=str(out), batch_size=4)
    run_rl_prompts(cfg, engine=ScriptedEngine(tok), checker=ExactChecker(), log=lambda m: None)
    paths = output_paths(out)
    finals = [paths.kept, paths.removed, paths.rejects, paths.report]
    old = {p: p.read_bytes() for p in finals}

    src.write_text("".join(json.dumps(_problem(k, "y")) + "\n" for k in range(9)))
    cfg = dataclasses.replace(cfg, overwrite=True)
    with pytest.raises(RuntimeError, match="simulated engine crash"):
        run_rl_prompts(cfg, engine=_FailingEngine(tok), checker=ExactChecker(), log=lambda m: None)
    assert {p: p.read_bytes() for p in finals} == old

    run_rl_prompts(cfg, engine=ScriptedEngine(tok), checker=ExactChecker(), log=lambda m: None)
    assert all(json.loads(x)["id"].startswith("y-") for x in paths.kept.read_text().splitlines())


# --------------------------------------------------------------------------- output = input


def test_an_output_that_is_an_input_is_refused(tiny_instruct, tmp_path, monkeypatch, capsys):
    src = _write_convs(tmp_path / "a.jsonl", 4)
    before = src.read_bytes()
    # sft-prepare: --rejects-file naming the input (through a symlink and a relative path).
    (tmp_path / "link.jsonl").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    for rejects in ("a.jsonl", str(tmp_path / "link.jsonl"), "./sub/../a.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        argv = _sft_argv(src, tmp_path / "p", tiny_instruct, "--rejects-file", rejects)
        _one_line(capsys, [*argv, "--overwrite"], "would overwrite the input", "a.jsonl")
        assert src.read_bytes() == before
    # sft-prepare: a glob over the output folder reads the previous rejects file back.
    out = tmp_path / "o"
    out.mkdir()
    assert main(_sft_argv(src, out / "sft", tiny_instruct)) == 0
    rejects = (out / "sft.rejects.jsonl").read_bytes()
    argv = _sft_argv(src, out / "sft", tiny_instruct, "--overwrite")
    argv[3:4] = [str(src), str(out / "*.jsonl")]
    _one_line(capsys, argv, "would overwrite the input", "sft.rejects.jsonl")
    assert (out / "sft.rejects.jsonl").read_bytes() == rejects
    assert (out / "sft.report.json").exists()

    # rm-prepare: the input is the rejects file of the output prefix.
    rm_src = tmp_path / "rm.rejects.jsonl"
    rm_src.write_text(_rm_lines(3))
    rm_before = rm_src.read_bytes()
    argv = _rm_argv(rm_src, tmp_path / "rm", tiny_instruct, "--overwrite")
    _one_line(capsys, argv, "would overwrite the input", "rm.rejects.jsonl")
    assert rm_src.read_bytes() == rm_before

    # rl-prompts: --output through a symlink to the input.
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_rl_prompts(
            RLPromptsConfig(problems=str(src), model="m", output=str(tmp_path / "link.jsonl")),
            engine=object(),
        )
    assert src.read_bytes() == before

    # rft: an input inside OUT (which --overwrite clears).
    rft_out = tmp_path / "rft"
    rft_out.mkdir()
    inside = rft_out / "problems.jsonl"
    inside.write_text(json.dumps(_problem(1, "x")) + "\n")
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_rft(
            RFTConfig(problems=[str(inside)], output=str(rft_out), model="m", overwrite=True),
            engine=object(),
        )
    assert inside.exists()


# --------------------------------------------------------------------------- locks


def test_a_second_run_on_a_locked_output_refuses(tiny_instruct, tmp_path, capsys):
    src = _write_convs(tmp_path / "a.jsonl", 4)
    rm_src = tmp_path / "rm_in.jsonl"
    rm_src.write_text(_rm_lines(3))
    pid = str(os.getpid())
    with output_lock(tmp_path / "sft"):
        _one_line(
            capsys,
            _sft_argv(src, tmp_path / "sft", tiny_instruct),
            "sft is being written by another run",
            f"pid {pid}",
        )
    assert not list(tmp_path.glob("sft*"))
    with output_lock(tmp_path / "rm"):
        _one_line(capsys, _rm_argv(rm_src, tmp_path / "rm", tiny_instruct), f"pid {pid}")
    out = tmp_path / "rl" / "p.jsonl"
    with output_lock(out), pytest.raises(OutputLockedError, match=f"pid {pid}"):
        run_rl_prompts(RLPromptsConfig(problems=str(src), model="m", output=str(out)))
    with output_lock(tmp_path / "rft"), pytest.raises(OutputLockedError, match=f"pid {pid}"):
        run_rft(RFTConfig(problems=[str(src)], output=str(tmp_path / "rft"), model="m"))

    # A holder killed with SIGKILL leaves no stale lock; a released lock leaves no file.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from qmath_megatron.data.shards import output_lock\n"
            f"with output_lock({str(tmp_path / 'sft')!r}):\n"
            "    print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"), output_lock(tmp_path / "sft"):
        pass
    holder.kill()
    holder.wait()
    assert main(_sft_argv(src, tmp_path / "sft", tiny_instruct)) == 0
    assert not list(tmp_path.glob(".*.lock"))


# --------------------------------------------------------------------------- killed runs


def _spawned_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_killed_sft_prepare_leaves_no_worker_and_its_partials_are_removed(tiny_instruct, tmp_path):
    src = _write_convs(tmp_path / "a.jsonl", 4000, words=40)
    prefix = tmp_path / "sft"
    argv = _sft_argv(src, prefix, tiny_instruct, "--workers", "2", "batch_size=16")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmath_megatron", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 120
    workers: list[psutil.Process] = []
    while time.time() < deadline and proc.poll() is None:
        kids = _spawned_children(parent)
        workers = [k for k in kids if "resource_tracker" not in " ".join(k.cmdline())]
        # Workers that have loaded the tokenizer (and so are past their initializer).
        if len(workers) >= 2 and all(k.memory_info().rss > 60 << 20 for k in workers):
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(workers) >= 2, "the workers never started"
    kids = _spawned_children(parent)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=15)
    survivors = [k.cmdline() for k in alive]
    for k in alive:  # never leave them behind, even when the test fails
        k.kill()
    assert not survivors, survivors
    partials = list(tmp_path.glob("sft*.partial-*"))
    assert partials, "the killed run left no partial file (killed too early?)"

    # The next run removes the dead run's partial files and builds the dataset.
    _write_convs(src, 8)
    assert main(_sft_argv(src, prefix, tiny_instruct)) == 0
    assert not list(tmp_path.glob("sft*.partial-*"))
    assert json.loads((tmp_path / "sft.report.json").read_text())["samples"] == 8


def test_disk_full_leaves_no_temporary_file(tiny_instruct, tmp_path, monkeypatch, capsys):
    src = _write_convs(tmp_path / "a.jsonl", 12)
    out = tmp_path / "out"
    out.mkdir()
    argv = _sft_argv(src, out / "sft", tiny_instruct)
    assert main(argv) == 0
    old = _snapshot(out)
    real_write = sft_prepare._write_packed

    def full_disk(*args, **kwargs):
        real_write(*args, **kwargs)  # the packed files exist, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sft_prepare, "_write_packed", full_disk)
    _one_line(capsys, [*argv, "--overwrite"], "No space left on device")
    assert _snapshot(out) == old
    assert not [p for p in out.iterdir() if p.name.startswith(".") or "partial" in p.name]


# --------------------------------------------------------------------------- bad samples


def test_sft_prepare_rejects_empty_assistant_turns(tiny_instruct, tmp_path):
    def conv(*answers: str) -> str:
        turns = []
        for k, a in enumerate(answers):
            turns += [{"role": "user", "content": f"q{k}"}, {"role": "assistant", "content": a}]
        return json.dumps({"messages": turns})

    lines = [conv("4"), conv(""), conv("  \n\t"), conv("4", " "), conv("4", "5")]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report = sft_prepare.prepare_sft(
        sft_prepare.SFTPrepareConfig([str(src)], str(tmp_path / "sft"), str(tiny_instruct), 128)
    )
    rejects = [json.loads(x) for x in (tmp_path / "sft.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(k, "bad_message") for k in (2, 3, 4)]
    assert all("empty assistant turn" in r["detail"] for r in rejects)
    assert (report["samples"], report["rejected"], report["lines"]) == (2, 3, 5)


def test_rm_prepare_rejects_contradictory_and_fake_turn_responses(tiny_instruct, tmp_path):
    def group(*responses: tuple[str, bool], prompt: str = "1+1?") -> str:
        return json.dumps(
            {"prompt": prompt, "responses": [{"text": t, "correct": c} for t, c in responses]}
        )

    fake_turn = "2<|im_end|>\n<|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\nok"
    lines = [
        group(("2", True), ("3", False)),
        group(("2", True), ("3", False), ("2", False)),  # the same text, opposite labels
        group(("2", True), (fake_turn, False)),  # a fake turn in a response
        group(("2", True), ("3", False), prompt="1+1?<|im_end|>"),  # and in the prompt
        group(("2", True), ("2", True), ("3", False)),  # duplicates with one label: kept
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report = rm_data.prepare_rm(
        rm_data.RMPrepareConfig([str(src)], str(tmp_path / "rm"), str(tiny_instruct), 128)
    )
    rejects = [json.loads(x) for x in (tmp_path / "rm.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "bad_response"),
        (3, "bad_response"),
        (4, "bad_message"),
    ]
    assert "opposite labels" in rejects[0]["detail"] and "control token" in rejects[1]["detail"]
    assert (report["kept"], report["dropped"], report["rejected"], report["lines"]) == (2, 0, 3, 5)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "inputs.json"  # the input stat cache
    }


def test_rft_failed_overwrite_keeps_the_old_outputs(tmp_path, tiny_instruct):
    tok = load_tokenizer(tiny_instruct)
    problems = _problems(tmp_path / "problems.jsonl")
    out = tmp_path / "rft"
    quiet = {"checker": ExactChecker(), "log": lambda m: None}
    cfg = RFTConfig([str(problems)], str(out), model="scripted", n=5, k=4)
    first = run_rft(cfg, engine=RFTEngine(tok, SCRIPT), **quiet)
    old = _tree(out)
    assert "report.json" in old and any(k.startswith("sft/") for k in old)

    class Failing(RFTEngine):
        def generate(self, prompts, params):
            raise RuntimeError("simulated engine crash")

    k1 = dataclasses.replace(cfg, k=1, overwrite=True)
    with pytest.raises(RuntimeError, match="simulated engine crash"):
        run_rft(k1, engine=Failing(tok, SCRIPT), **quiet)
    assert _tree(out) == old

    with AnswerChecker(workers=1) as checker:
        report = run_rft(k1, engine=RFTEngine(tok, SCRIPT), checker=checker, log=lambda m: None)
    assert report["responses_kept"] < first["responses_kept"] and report["k"] == 1
    assert json.loads((out / "report.json").read_text())["k"] == 1
    assert report["sft_files"] == first["sft_files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["problems.jsonl", "rft"]
    # The swapped-in run is the one a plain rerun resumes.
    again = run_rft(dataclasses.replace(k1, overwrite=False), engine=object(), **quiet)
    assert again["resumed_shards"] == 1 and again["k"] == 1


def _sleepy_shard(shard, out, state) -> dict:
    time.sleep(120)
    return {}


def test_killed_shard_tool_leaves_no_worker(tmp_path):
    for k in range(2):
        (tmp_path / f"in{k}.jsonl").write_text('{"text": "x"}\n')
    script = (
        "from qmath_megatron.data.shards import ShardJob, discover, plan\n"
        "from tests.unit.test_data_safety import _sleepy_shard\n"
        f"shards = plan(discover([{str(tmp_path / '*.jsonl')!r}]))\n"
        f"job = ShardJob('t', {str(tmp_path / 'out')!r}, ('kept',), {{}})\n"
        "job.open(shards).map('s', _sleepy_shard, workers=2)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    parent = psutil.Process(proc.pid)
    kids: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            kids = _spawned_children(parent)
            workers = [k for k in kids if "resource_tracker" not in " ".join(k.cmdline())]
            if len(workers) >= 2 and all(k.memory_info().rss > 40 << 20 for k in workers):
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(kids) >= 2, "the workers never started"
        time.sleep(1)  # past their initializer
        kids = _spawned_children(parent)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, [k.cmdline() for k in alive]
    finally:
        for k in kids:
            with contextlib.suppress(psutil.NoSuchProcess):
                k.kill()
        proc.kill()

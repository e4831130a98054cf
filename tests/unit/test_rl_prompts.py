"""`qmath data rl-prompts`: keeps problems solved min..max of n times; every input line in
exactly one of kept / removed / rejects (several inputs with identical basenames, every
reject kind); resumable on data/shards.py (kill -9, rerun: byte-identical; a changed setting
refused unless --overwrite); --mode tir through rl/tir.py with the real sandbox executing
the code; the engine path on the tiny model; one-line errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qmath_megatron.data.readers import iter_raw_lines
from qmath_megatron.evaluation.tir import OUTPUT_STOP
from qmath_megatron.inference.engine import Completion
from qmath_megatron.rl.prompts import (
    RL_REJECT_REASONS,
    RLPromptsConfig,
    derived_correct_range,
    output_paths,
    run_rl_prompts,
    side_paths,
)
from tests.unit.jsonl_files import write_jsonl


def _k(text: str) -> int:
    return int(text.split("PROBLEM p")[1].split(" ")[0])


class ScriptedEngine:
    """Answers problem "p<k>" correctly in the first k of its n samples. ``die_on_call``:
    the process kills itself (SIGKILL) at that generate call, as the OOM killer would."""

    def __init__(self, tokenizer, die_on_call: int | None = None):
        self.tokenizer = tokenizer
        self.calls = []
        self.die_on_call = die_on_call

    def generate(self, prompts, params):
        self.calls.append(params)
        if len(self.calls) == self.die_on_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return [
            [
                Completion(f"The answer is \\boxed{{{7 if j < _k(p) else 3}}}.")
                for j in range(params.n)
            ]
            for p in prompts
        ]


class TIRScriptedEngine:
    """A TIR model on token ids: problem "p<k>", sample j writes a program printing 2+5 (the
    answer, 7) when j < k, else 1+2; once the prompt holds an output block, it boxes what
    the sandbox printed. The verdicts therefore depend on the code really running."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def _completion(self, text: str, stop: str | None) -> Completion:
        ids = self.tokenizer(text + (stop or ""), add_special_tokens=False)["input_ids"]
        return Completion(text, ids, [-0.5] * len(ids), "stop", stop)

    def generate(self, prompts, params):
        out = []
        for p in prompts:
            assert not isinstance(p, str), "TIR rollouts send token ids"
            text = self.tokenizer.decode(p)
            self.prompts.append(text)
            if "```output\n" in text:
                printed = text.rsplit("```output\n", 1)[1].split("\n```", 1)[0].strip()
                out.append([self._completion(f"So the answer is \\boxed{{{printed}}}.", None)])
            else:
                code = [
                    f"```python\nprint({'2+5' if j < _k(text) else '1+2'})\n```\n"
                    for j in range(params.n)
                ]
                out.append([self._completion(c, OUTPUT_STOP) for c in code])
        return out


class ExactChecker:
    """String equality (for the forked run: the shared checker's worker pool is not fork-safe)."""

    def equivalent_many(self, pairs):
        return [SimpleNamespace(equal=a == b) for a, b in pairs]


@pytest.fixture(scope="module")
def tok(tiny_instruct):
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    return load_tokenizer(tiny_instruct)


@pytest.fixture(scope="module")
def checker():
    from qmath_megatron.rewards.checker import AnswerChecker

    c = AnswerChecker(workers=1)
    yield c
    c.close()


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n") if x]


def _problem(k: int, tag: str, **extra) -> dict:
    return {"problem": f"PROBLEM p{k} end", "answer": "7", "id": f"{tag}-{k}", **extra}


def test_filter_keeps_two_to_five_of_eight(tmp_path, tok, checker):
    lines = [json.dumps(_problem(k, "x")) for k in range(9)]
    lines += ["{not json", json.dumps({"problem": "PROBLEM p3 end"}), "", json.dumps([1])]
    src = tmp_path / "problems.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rl" / "prompts.jsonl"
    engine = ScriptedEngine(tok)
    cfg = RLPromptsConfig(problems=str(src), model="unused", output=str(out), batch_size=4)
    r = run_rl_prompts(cfg, engine=engine, checker=checker)
    kept = _lines(out)
    removed_path, rejects_path = side_paths(out)
    removed, rejects = _lines(removed_path), _lines(rejects_path)
    assert [k["id"] for k in kept] == ["x-2", "x-3", "x-4", "x-5"]
    assert all(
        k["rl_correct"] == int(k["id"][2:]) and k["rl_n"] == 8 and k["rl_mode"] == "cot"
        for k in kept
    )
    assert {(x["id"], x["reason"]) for x in removed} == {
        ("x-0", "too_hard"),
        ("x-1", "too_hard"),
        ("x-6", "too_easy"),
        ("x-7", "too_easy"),
        ("x-8", "too_easy"),
    }
    assert [(x["reason"], x["line"]) for x in rejects] == [
        ("invalid_json", 10),
        ("missing_answer", 11),
        ("empty", 12),
        ("not_an_object", 13),
    ]
    assert len(kept) + len(removed) + len(rejects) == 13 == r["problems"]  # every line, once
    assert r["correct_histogram"] == {k: 1 for k in range(9)}
    assert (r["kept"], r["too_easy"], r["too_hard"], r["rejected"]) == (4, 3, 2, 4)
    assert json.loads(output_paths(out).report.read_text())["kept"] == 4
    # Chunks of 4 problems, each seeded on its own; every request samples 8 at temperature 1.
    assert [p.n for p in engine.calls] == [8, 8, 8] and {p.temperature for p in engine.calls} == {
        1.0
    }
    assert len({p.seed for p in engine.calls}) == 3
    # A file at --output that no run of this tool wrote is not replaced silently.
    other = tmp_path / "other.jsonl"
    other.write_text("mine\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_rl_prompts(
            RLPromptsConfig(problems=str(src), model="unused", output=str(other)),
            engine=engine,
            checker=checker,
        )
    assert other.read_text() == "mine\n"


BAD = [
    b"{not json",
    b'{"problem": "bad \xff\xfe utf8", "answer": "1"}',
    b"[1, 2]",
    b'{"question": "no problem key", "answer": "1"}',
    b'{"problem": 7, "answer": "1"}',
    b'{"problem": "   ", "answer": "1"}',
    b"",
    b'{"problem": "lone \\ud800 surrogate", "answer": "1"}',
    b'{"problem": "PROBLEM p3 no answer"}',
    b'{"problem": "PROBLEM p3 list", "answer": [1]}',
]


def _write(path: Path, tag: str, cut: bool = False) -> None:
    rows = [_problem(k, tag) for k in range(9)]
    rows[2]["problem"] += " line\u2028sep, para\u2029sep, next\u0085line"
    write_jsonl(path, rows, BAD, bad_at=2, cut=cut)


def test_every_line_once_resume_and_changed_settings(tmp_path, tok, checker):
    names = ["a/p.jsonl", "b/p.jsonl", "a/p.jsonl.gz", "c/p.jsonl.zst"]
    for i, rel in enumerate(names):
        _write(tmp_path / "in" / rel, f"f{i}", cut=rel.endswith(".zst"))
    inputs = [str(tmp_path / "in" / "**" / "*.jsonl*")]
    out = tmp_path / "out" / "rl.jsonl"
    cfg = RLPromptsConfig(
        problems=inputs,
        model="m",
        output=str(out),
        n=4,
        min_correct=1,
        max_correct=3,
        batch_size=3,
        shard_mb=400 / 2**20,
    )
    with pytest.raises(ValueError, match=r"c/p\.jsonl\.zst: truncated zstd"):
        run_rl_prompts(cfg, engine=ScriptedEngine(tok), checker=checker)
    cfg = RLPromptsConfig(**{**vars(cfg), "allow_truncated": True, "overwrite": True})
    logs: list[str] = []
    r = run_rl_prompts(cfg, engine=ScriptedEngine(tok), checker=checker, log=logs.append)
    assert r["shards"] > len(names)  # the plain files were cut into several shards
    assert any("[filter " in m for m in logs)  # a progress line per shard
    p = output_paths(out)
    kept, removed, rejects = _lines(p.kept), _lines(p.removed), _lines(p.rejects)
    for i, rel in enumerate(names):
        read = list(iter_raw_lines(tmp_path / "in" / rel, allow_truncated=True))
        mine = [x for x in kept + removed if x["id"].startswith(f"f{i}-")]
        mine_rejects = [x for x in rejects if x["source"] == rel]
        assert len(mine) + len(mine_rejects) == len(read), rel  # every line, exactly once
        assert len({x["id"] for x in mine}) == len(mine)
    assert {x["reason"] for x in rejects} == set(RL_REJECT_REASONS)  # every reject kind
    assert sum(x["reason"] == "truncated_input" for x in rejects) == 1
    assert (len(kept), len(removed), len(rejects)) == (
        r["kept"],
        r["too_easy"] + r["too_hard"],
        r["rejected"],
    )
    assert (
        r["lines"]
        == r["problems"]  # the count's first name, kept
        == len(kept) + len(removed) + len(rejects)
        == sum(r["rejects"].values()) + r["sampled_problems"]
    )
    assert {x["rl_correct"] for x in kept} == {1, 2, 3} and any(
        "\u2028" in x["problem"] for x in kept
    )
    before = {f: f.read_bytes() for f in (p.kept, p.removed, p.rejects)}

    # The same command again: every shard is done, nothing is sampled, same bytes.
    engine, logs = ScriptedEngine(tok), []
    cfg = RLPromptsConfig(**{**vars(cfg), "overwrite": False})
    again = run_rl_prompts(cfg, engine=engine, checker=checker, log=logs.append)
    assert engine.calls == [] and again["resumed_shards"] == r["shards"]
    assert any("resumed" in m for m in logs)
    assert {f: f.read_bytes() for f in before} == before
    # A changed setting is refused, naming it; --overwrite redoes the run.
    with pytest.raises(ValueError, match=r"setting n: 4 -> 5.*--overwrite"):
        run_rl_prompts(RLPromptsConfig(**{**vars(cfg), "n": 5}), engine=engine, checker=checker)
    redo = run_rl_prompts(
        RLPromptsConfig(**{**vars(cfg), "n": 5, "overwrite": True}),
        engine=ScriptedEngine(tok),
        checker=checker,
    )
    assert redo["resumed_shards"] == 0 and {x["rl_n"] for x in _lines(p.kept)} == {5}


def _killed_run(cfg: RLPromptsConfig, tok) -> None:
    run_rl_prompts(
        cfg, engine=ScriptedEngine(tok, die_on_call=3), checker=ExactChecker(), log=lambda m: None
    )


def test_kill_9_then_rerun_gives_byte_identical_outputs(tmp_path, tok):
    src = tmp_path / "problems.jsonl"
    src.write_text(
        "".join(json.dumps(_problem(k % 9, f"x{k}")) + "\n" for k in range(40)) + "{bad\n"
    )

    def cfg(out: Path) -> RLPromptsConfig:
        return RLPromptsConfig(
            problems=str(src), model="m", output=str(out), batch_size=3, shard_mb=300 / 2**20
        )

    ref = tmp_path / "ref" / "rl.jsonl"
    run_rl_prompts(cfg(ref), engine=(full := ScriptedEngine(tok)), checker=ExactChecker())

    out = tmp_path / "run" / "rl.jsonl"
    child = mp.get_context("fork").Process(target=_killed_run, args=(cfg(out), tok))
    child.start()
    child.join(60)
    if child.is_alive():  # never leave it running (the assertion below then fails)
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL
    p = output_paths(out)
    done = list((p.shards / ".qmath" / "done" / "filter").glob("*.json"))
    assert len(done) > 0 and not p.kept.exists()  # killed mid-run: some shards done, no output

    engine, logs = ScriptedEngine(tok), []
    r = run_rl_prompts(cfg(out), engine=engine, checker=ExactChecker(), log=logs.append)
    assert r["resumed_shards"] == len(done) and any("resumed filter" in m for m in logs)
    assert 0 < len(engine.calls) < len(full.calls)  # only the unfinished shards were sampled
    rp = output_paths(ref)
    for mine, theirs in ((p.kept, rp.kept), (p.removed, rp.removed), (p.rejects, rp.rejects)):
        assert mine.read_bytes() == theirs.read_bytes() and mine.stat().st_size > 0


def test_tir_mode_runs_the_code_in_the_sandbox(tmp_path, tok, checker):
    from qmath_megatron.tokenizer.chat import SYSTEM_PROMPTS

    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(_problem(k, "t")) + "\n" for k in range(4)))
    out = tmp_path / "rl.jsonl"
    engine = TIRScriptedEngine(tok)
    cfg = RLPromptsConfig(
        problems=str(src), model="m", output=str(out), mode="tir", n=3, min_correct=1, max_correct=2
    )
    r = run_rl_prompts(cfg, engine=engine, checker=checker)  # the real sandbox runs the code
    kept, removed = _lines(out), _lines(output_paths(out).removed)
    assert [(x["id"], x["rl_correct"], x["rl_mode"]) for x in kept] == [
        ("t-1", 1, "tir"),
        ("t-2", 2, "tir"),
    ]
    assert [(x["id"], x["reason"]) for x in removed] == [("t-0", "too_hard"), ("t-3", "too_easy")]
    assert r["correct_histogram"] == {0: 1, 1: 1, 2: 1, 3: 1}
    # First round: the TIR system prompt; later rounds carry the sandbox's real output.
    assert SYSTEM_PROMPTS["tir"].split("\n")[0] in engine.prompts[0]
    outputs = {
        t.rsplit("```output\n", 1)[1].split("\n")[0] for t in engine.prompts if "```output\n" in t
    }
    assert outputs == {"7", "3"}


def test_the_engine_path_on_the_tiny_model(tmp_path, tiny_instruct, checker):
    """The engine built from --model (transformers on CPU), TIR rollouts on its token ids and
    log-probs, the model directory fingerprinted (one mode: loading the model costs seconds)."""
    src = tmp_path / "problems.jsonl"
    src.write_text(json.dumps({"problem": "What is 1+1?", "answer": "2"}) + "\n")
    out = tmp_path / "rl.jsonl"
    cfg = RLPromptsConfig(
        problems=str(src),
        model=str(tiny_instruct),
        output=str(out),
        mode="tir",
        engine="transformers",
        n=2,
        min_correct=1,
        max_correct=2,
        max_new_tokens=6,
    )
    r = run_rl_prompts(cfg, checker=checker)  # a random model: nothing solved
    assert (r["too_hard"], r["kept"]) == (1, 0)
    (row,) = _lines(output_paths(out).removed)
    assert (row["rl_correct"], row["rl_n"], row["rl_mode"]) == (0, 2, "tir")
    manifest = json.loads((output_paths(out).shards / ".qmath" / "manifest.json").read_text())
    assert "model.safetensors" in manifest["settings"]["model"]  # the model is fingerprinted
    assert manifest["settings"]["engine"] == "transformers" and manifest["settings"]["tir"]


def test_errors_are_one_line(tmp_path, tok):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "qmath_megatron", "data", "rl-prompts", *args],
            capture_output=True,
            text=True,
        )

    r = run(
        "--problems",
        str(tmp_path / "missing.jsonl"),
        "--model",
        "m",
        "--output",
        str(tmp_path / "o.jsonl"),
    )
    assert r.returncode != 0 and "qmath: error: no input files match" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=r"need 0 <= --min-correct \(6\)"):
        RLPromptsConfig(problems="x", model="m", output="o", min_correct=6)
    with pytest.raises(ValueError, match="--mode must be one of cot, tir"):
        RLPromptsConfig(problems="x", model="m", output="o", mode="pot")
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(_problem(1, "e")) + "\n")
    with pytest.raises(FileNotFoundError, match="model not found"):
        run_rl_prompts(
            RLPromptsConfig(
                problems=str(src), model=str(tmp_path / "nope"), output=str(tmp_path / "o.jsonl")
            )
        )
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_rl_prompts(
            RLPromptsConfig(problems=str(src), model="m", output=str(src)), engine=object()
        )
    # A glob that would read the tool's own outputs back in (a rerun with `dir/**`) is refused.
    run_rl_prompts(
        RLPromptsConfig(problems=str(src), model="m", output=str(tmp_path / "o" / "rl.jsonl")),
        engine=ScriptedEngine(tok),
        checker=ExactChecker(),
    )
    with pytest.raises(ValueError, match="would overwrite the input"):
        run_rl_prompts(
            RLPromptsConfig(
                problems=[str(tmp_path / "**" / "*.jsonl")],
                model="m",
                output=str(tmp_path / "o" / "rl.jsonl"),
            ),
            engine=object(),
        )


def test_cli_flags_and_defaults_come_from_the_config():
    import dataclasses

    from qmath_megatron.cli import build_parser

    argv = [
        "data",
        "rl-prompts",
        "--problems",
        "a.jsonl",
        "b/*.jsonl.gz",
        "--model",
        "m",
        "--output",
        "o.jsonl",
        "--mode",
        "tir",
        "--allow-truncated",
    ]
    args = vars(build_parser().parse_args(argv))
    assert (args["problems"], args["mode"], args["allow_truncated"]) == (
        ["a.jsonl", "b/*.jsonl.gz"],
        "tir",
        True,
    )
    checked = 0
    for f in dataclasses.fields(RLPromptsConfig):
        if (
            f.name in args
            and f.default is not dataclasses.MISSING
            and f.name not in ("mode", "allow_truncated")
        ):
            assert args[f.name] == f.default, f.name
            checked += 1
    assert checked == 14  # every flag with a default (the checker workers/timeout have none)


def test_correct_range_is_derived_from_n_unless_given():
    """Without --min-correct / --max-correct the report's 2..5 of 8 is scaled to --n: --n 2
    keeps problems solved once of twice (it was refused until both flags were lowered)."""
    expected = {1: (1, 0), 2: (1, 1), 3: (1, 1), 4: (1, 2), 6: (2, 3), 8: (2, 5), 16: (4, 10)}
    assert {n: derived_correct_range(n) for n in expected} == expected
    for n in range(2, 65):  # solved sometimes, never never and never always
        low, high = derived_correct_range(n)
        assert 1 <= low <= high <= n - 1, n

    def cfg(**kw):
        return RLPromptsConfig(problems="x", model="m", output="o", **kw)

    assert (cfg().min_correct, cfg().max_correct) == (2, 5)  # the default n: unchanged
    assert (cfg(n=2).min_correct, cfg(n=2).max_correct) == (1, 1)
    assert (cfg(n=4, max_correct=3).min_correct, cfg(n=4, max_correct=3).max_correct) == (1, 3)
    assert (cfg(n=16, min_correct=0).min_correct, cfg(n=16, min_correct=0).max_correct) == (0, 10)
    with pytest.raises(ValueError, match=r"\(min_correct, max_correct derived from --n 1\)"):
        cfg(n=1)
    with pytest.raises(ValueError, match=r"--max-correct \(2\) <= --n \(4\) \(max_correct "):
        cfg(n=4, min_correct=3)
    with pytest.raises(ValueError, match=r"--max-correct \(9\) <= --n \(8\)\Z"):
        cfg(min_correct=2, max_correct=9)  # both given: nothing derived to name


def test_cli_summary_counts_lines_and_shows_the_derived_range(
    tmp_path, tok, checker, capsys, monkeypatch
):
    from qmath_megatron.cli import build_parser
    from qmath_megatron.rl import cli as rl_cli
    from qmath_megatron.rl import prompts as rl_prompts

    src = tmp_path / "p.jsonl"
    rows = [{"id": f"a{k}", "problem": f"PROBLEM p{k} x", "answer": "7"} for k in range(3)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    out = tmp_path / "o.jsonl"
    argv = ["data", "rl-prompts", "--problems", str(src), "--model", "m", "--output", str(out)]
    args = build_parser().parse_args([*argv, "--n", "2"])
    engine = ScriptedEngine(tok)
    real = rl_prompts.run_rl_prompts  # the command imports it when it runs
    monkeypatch.setattr(
        rl_prompts, "run_rl_prompts", lambda cfg: real(cfg, engine=engine, checker=checker)
    )
    assert rl_cli.run_rl_prompts_command(args) == 0
    text = capsys.readouterr().out
    # 4 input lines: one rejected, 3 problems (p0 never solved, p1 once of 2, p2 twice).
    assert text.startswith("rl-prompts (cot): 4 lines, 1 kept (1..1 of 2 correct)"), text

"""GRPO's checks before any rollout engine starts (rl/prepare.py): the prompts file (empty,
rows without an answer or a problem, fewer problems than a step takes, prompts that leave
no room to generate), the paths the job names, the engines' start weights without
``checkpoint.save``, the head_dim vLLM's CPU attention runs; every error one line naming
the file and its lines. Through ``qmath train grpo`` itself, with the engine start patched
to fail the test, each error comes before any engine and its time is recorded. Also: every
tiny recipe of every stage has a save directory, and the tiny math recipe builds."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import textwrap

import pytest

from qmath_megatron.config.overrides import apply_overrides
from qmath_megatron.rl.prepare import (
    check_config,
    load_problems,
    validate_job,
    with_synthetic_prompts,
    write_synthetic_prompts,
)
from qmath_megatron.rl.recipes import tiny_cpu_grpo, tiny_cpu_grpo_math
from qmath_megatron.training.cli import STAGES, resolve_job


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _math_job(tmp_path, prompts: str, *extra: str):
    """The tiny math recipe on ``prompts`` with paths that exist (an empty engine model
    directory unless ``extra`` names one) and no SFT checkpoint to start from."""
    engine = tmp_path / "engine"
    engine.mkdir(exist_ok=True)
    return apply_overrides(
        tiny_cpu_grpo_math(),
        [
            f"data.prompts={prompts}",
            f"rl.engine_model={engine}",
            "model.init_from=null",
            f"checkpoint.save={tmp_path / 'run'}",
            *extra,
        ],
    )


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

    return build_qwen25_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def test_prompt_rows_are_checked_with_their_line_numbers(tmp_path):
    good = {"problem": "What is 1+1?", "answer": "2"}
    # "answer": null is the silent failure: its reference would be the text "None".
    path = _write(tmp_path / "p.jsonl", [good, {"problem": "x", "answer": None}, good])
    with pytest.raises(ValueError) as err:
        load_problems(path, "math")
    line = _one_line(err)
    assert f"data.prompts {path}: 1 of 3 rows unusable" in line
    assert 'no "answer" (absent, null, blank, a list or an object) at line 2)' in line
    rows = [
        good,
        {"problem": "a"},  # 2: no answer
        "",  # blank lines are skipped, not counted
        {"problem": "b", "answer": "  "},  # 4
        "{not json",  # 5
        {"problem": "", "answer": "1"},  # 6
        {"problem": "c", "answer": ["1", "2"]},  # 7
        {"problem": "d", "answer": None},  # 8
        {"problem": "e", "answer": None},  # 9
        {"problem": "f", "answer": None},  # 10
        {"problem": 3, "answer": "3"},  # 11
        [1, 2],  # 12
        {"problem": "g", "answer": 0},  # a number is an answer
    ]
    path = _write(tmp_path / "many.jsonl", rows)
    with pytest.raises(ValueError) as err:
        load_problems(path, "math")
    line = _one_line(err)
    assert f"{path}: 10 of 12 rows unusable" in line, line
    assert (
        'no "answer" (absent, null, blank, a list or an object) at lines 2, 4, 7, 8, 9, ...' in line
    )
    assert "not a JSON object at lines 5, 12" in line
    assert 'no "problem" text at lines 6, 11' in line
    problems, numbers = load_problems(_write(tmp_path / "ok.jsonl", [good, "", rows[-1]]), "math")
    assert problems == [good, rows[-1]] and numbers == [1, 3]
    for empty in ([], ["", "  "]):
        path = _write(tmp_path / "empty.jsonl", empty)
        with pytest.raises(ValueError, match=f"data.prompts {path} is empty: no problems"):
            load_problems(path, "math")
    with pytest.raises(ValueError, match="rl.task=math needs data.prompts"):
        load_problems(None, "math")


def test_fewer_problems_than_a_step_takes_are_refused(tmp_path, tokenizer_dir):
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)]
    job = _math_job(tmp_path, _write(tmp_path / "p.jsonl", rows), f"data.tokenizer={tokenizer_dir}")
    assert job.data.global_batch_size == 4
    with pytest.raises(ValueError) as err:
        validate_job(job, on_gpu=False, resuming=False)
    assert "has 3 problems but each step samples data.global_batch_size=4 distinct" in _one_line(
        err
    )
    job = apply_overrides(job, ["data.global_batch_size=2"])
    assert validate_job(job, on_gpu=False, resuming=False) == rows


def test_prompts_must_leave_room_to_generate(tmp_path, tokenizer_dir):
    from qmath_megatron.tokenizer.chat import build_prompt
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    rows = [{"problem": "What is " + "1+" * k + "1?", "answer": str(k + 1)} for k in range(6)]
    path = _write(tmp_path / "p.jsonl", rows)
    lengths = [
        len(tok(build_prompt(tok, r["problem"], "cot"), add_special_tokens=False)["input_ids"])
        for r in rows
    ]
    assert lengths == sorted(lengths) and len(set(lengths)) == 6
    # seq_length = the 4th prompt's length: prompts 4..6 (lines 4-6) leave no room at all.
    seq = lengths[3]
    job = _math_job(tmp_path, path, f"data.tokenizer={tokenizer_dir}", f"model.seq_length={seq}")
    with pytest.raises(ValueError) as err:
        validate_job(job, on_gpu=False, resuming=False)
    line = _one_line(err)
    assert f"data.prompts {path}: 3 prompts leave no room to generate within " in line
    assert f"model.seq_length={seq} (the longest: {lengths[5]} tokens" in line
    assert "at lines 4, 5, 6: raise model.seq_length" in line
    # Room for a response, but not for rl.max_new_tokens of it: one logged line.
    logged: list[str] = []
    job = apply_overrides(job, [f"model.seq_length={lengths[5] + 1}", "rl.max_new_tokens=16"])
    short = [n + 1 for n, k in enumerate(lengths) if k + 16 > lengths[5] + 1]
    assert validate_job(job, on_gpu=False, resuming=False, log=logged.append) == rows
    assert len(logged) == 1 and f"{len(short)} of 6 prompts in {path} leave fewer" in logged[0]
    assert "rl.max_new_tokens=16" in logged[0] and "responses are cut" in logged[0]
    # The tokenizer defaults to the engines' model directory (the rollouts tokenize there).
    job = apply_overrides(job, ["data.tokenizer=null", f"rl.engine_model={tokenizer_dir}"])
    logged.clear()
    assert validate_job(job, on_gpu=False, resuming=False, log=logged.append) == rows
    assert len(logged) == 1


def test_missing_paths_are_named_in_one_line(tmp_path, tokenizer_dir):
    rows = [{"problem": "x", "answer": "1"}] * 4
    path = _write(tmp_path / "p.jsonl", rows)
    job = _math_job(tmp_path, path, f"rl.rm_model={tmp_path / 'no_rm'}")
    with pytest.raises(FileNotFoundError) as err:
        validate_job(job, on_gpu=False, resuming=False)
    assert _one_line(err) == (
        f"not found: rl.rm_model={tmp_path / 'no_rm'} (a reward model: HF directory or "
        "Megatron checkpoint)"
    )
    # The recipe's own paths (the SFT model) are named together, with how to make them.
    job = apply_overrides(tiny_cpu_grpo_math(), [f"checkpoint.save={tmp_path / 'r'}"])
    job = apply_overrides(job, [f"data.prompts={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(FileNotFoundError) as err:
        validate_job(job, on_gpu=False, resuming=False)
    line = _one_line(err)
    assert line.startswith(f"not found: data.prompts={tmp_path / 'nope.jsonl'} (")
    assert "rl.engine_model=runs/tiny_cpu_sft_math_hf (the SFT model's HF directory" in line
    assert "model.init_from=runs/tiny_cpu_sft_math (the SFT model's Megatron checkpoint)" in line
    # A resumed run does not read model.init_from.
    job = _math_job(
        tmp_path, path, "model.init_from=/nonexistent/sft", f"data.tokenizer={tokenizer_dir}"
    )
    with pytest.raises(FileNotFoundError, match="model.init_from=/nonexistent/sft"):
        validate_job(job, on_gpu=False, resuming=False)
    assert validate_job(job, on_gpu=False, resuming=True) == rows
    # An engine model directory without a tokenizer: named before any engine starts.
    job = _math_job(tmp_path, path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        validate_job(job, on_gpu=False, resuming=False)


def test_engine_start_weights_need_a_save_dir_and_cpu_engines_a_head_dim_vllm_runs():
    toy = apply_overrides(tiny_cpu_grpo(), ["checkpoint.save=null"])
    with pytest.raises(ValueError) as err:
        check_config(toy, on_gpu=False)
    assert _one_line(err) == (
        "rl.task=toy_half_vocab without rl.engine_model writes the engines' random start "
        "weights under checkpoint.save (engine_init/): set checkpoint.save or rl.engine_model"
    )
    check_config(apply_overrides(toy, ["rl.engine_model=/some/hf"]), on_gpu=False)
    with pytest.raises(ValueError, match=r"rl.mode=tir needs rl.task=math"):
        check_config(apply_overrides(tiny_cpu_grpo(), ["rl.mode=tir"]), on_gpu=False)
    math = apply_overrides(tiny_cpu_grpo_math(), ["rl.engine_model=null"])
    with pytest.raises(ValueError, match=r"rl.task=math needs rl.engine_model \(the SFT model"):
        check_config(math, on_gpu=False)
    # head_dim 16 (the old tiny Qwen-vocabulary flavor) is refused on CPU, in one line.
    old = apply_overrides(tiny_cpu_grpo_math(), ["model.flavor=tiny-qwen-vocab"])
    with pytest.raises(ValueError) as err:
        check_config(old, on_gpu=False)
    assert _one_line(err).startswith(
        "model.flavor=tiny-qwen-vocab has head_dim 16 (hidden 64 / 4 heads), which vLLM's "
        "CPU attention cannot run (it supports 32, 64,"
    )
    check_config(old, on_gpu=True)  # GPU attention runs it
    check_config(apply_overrides(old, ["rl.placement=remote", "rl.engine_handles=d"]), on_gpu=False)
    check_config(tiny_cpu_grpo_math(), on_gpu=False)
    check_config(tiny_cpu_grpo(), on_gpu=False)


def test_every_tiny_recipe_of_every_stage_has_a_save_directory():
    seen = []
    for stage in STAGES:
        for name in importlib.import_module(stage.recipes).RECIPES:
            job = resolve_job(name, None, [], stage.name)
            if name.startswith("tiny_"):
                assert job.checkpoint.save == f"runs/{name}", (stage.name, name)
                seen.append(name)
            else:  # the GPU recipes checkpoint too (save_interval means something)
                assert job.checkpoint.save, (stage.name, name)
    assert {"tiny_cpu", "tiny_cpu_sft", "tiny_cpu_rm", "tiny_cpu_grpo"} <= set(seen)
    assert "tiny_cpu_grpo_math" in seen


def test_tiny_math_recipe_builds_and_its_synthetic_prompts_validate(tmp_path, tokenizer_dir):
    from qmath_megatron.models.flavors import get_flavor

    job = tiny_cpu_grpo_math()
    assert (job.rl.task, job.rl.mode, job.model.flavor) == ("math", "cot", "tiny-qwen-vocab-hd32")
    assert get_flavor(job.model.flavor).head_dim == 32
    assert (job.model.init_from, job.rl.engine_model) == (
        "runs/tiny_cpu_sft_math",
        "runs/tiny_cpu_sft_math_hf",
    )
    job = apply_overrides(
        job,
        [
            f"checkpoint.save={tmp_path / 'run'}",
            f"rl.engine_model={tokenizer_dir}",
            "model.init_from=null",
        ],
    )
    assert job.data.prompts is None and job.data.synthetic_problems == 256
    filled = with_synthetic_prompts(job)
    assert filled.data.prompts == str(tmp_path / "run" / "data" / "prompts.jsonl")
    written = write_synthetic_prompts(filled.data.prompts, filled.data.synthetic_problems)
    first = written.read_bytes()
    assert write_synthetic_prompts(written, 256).read_bytes() == first  # a resume: the same
    logged: list[str] = []
    problems = validate_job(filled, on_gpu=False, resuming=False, log=logged.append)
    assert len(problems) == 256 and logged == []  # every prompt fits with max_new_tokens
    assert all(p["answer"] and p["problem"] for p in problems)
    assert with_synthetic_prompts(
        apply_overrides(filled, ["data.prompts=x.jsonl"])
    ).data.prompts == ("x.jsonl")
    with pytest.raises(ValueError, match="data.synthetic_problems needs checkpoint.save"):
        with_synthetic_prompts(apply_overrides(job, ["checkpoint.save=null"]))


# ``qmath train grpo`` in one process, case after case, with every way to start an engine
# patched to leave a mark and raise: each case's error must come first. Prints one JSON
# line per case: its exit code, the text it wrote to stderr, the seconds to the error.
_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, os, sys, time
    started = time.perf_counter()
    from qmath_megatron.cli import main
    import qmath_megatron.inference.remote as remote
    import qmath_megatron.rl.engines as engines

    marker = sys.argv[1]

    def refuse(*args, **kwargs):
        with open(marker, "a") as f:
            f.write("an engine start was reached\\n")
        raise AssertionError("an engine start was reached")

    engines.plan_engines = engines.start_engines = engines.open_engines = refuse
    engines.RolloutEngines.start = engines.RolloutEngines.connect = classmethod(refuse)
    remote.RemoteEngine.__init__ = refuse
    for case in json.loads(sys.argv[2]):
        os.environ.pop("MASTER_PORT", None)  # a fresh process group per case
        err = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                rc = main(["train", "grpo", *case["argv"]])
        except BaseException as e:
            rc = f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        print(json.dumps({"case": case["name"], "rc": rc, "stderr": err.getvalue(),
                          "seconds": seconds, "since_start": time.perf_counter() - started}),
              flush=True)
    """
)


def test_errors_come_before_any_engine_starts_through_the_cli(tmp_path, tokenizer_dir, capsys):
    good = {"problem": "What is 1+1?", "answer": "2"}
    null_rows = _write(
        tmp_path / "null.jsonl",
        [good, {"problem": "p", "answer": None}, good]
        + [{"problem": "p", "answer": None}] * 6
        + [good],
    )
    few = _write(tmp_path / "few.jsonl", [good] * 3)
    math = [
        "--recipe",
        "tiny_cpu_grpo_math",
        "model.init_from=null",
        f"rl.engine_model={tokenizer_dir}",
    ]
    cases = {
        "null answers": (
            [*math, f"data.prompts={null_rows}", f"checkpoint.save={tmp_path / 'a'}"],
            f'qmath: error: data.prompts {null_rows}: 7 of 10 rows unusable (no "answer" '
            "(absent, null, blank, a list or an object) at lines 2, 4, 5, 6, 7, ...)",
        ),
        "too few problems": (
            [*math, f"data.prompts={few}", f"checkpoint.save={tmp_path / 'b'}"],
            f"qmath: error: data.prompts {few} has 3 problems but each step samples "
            "data.global_batch_size=4 distinct ones",
        ),
        "prompt too long": (
            [*math, "model.seq_length=30", f"checkpoint.save={tmp_path / 'c'}"],
            "prompts leave no room to generate within model.seq_length=30",
        ),
        "head_dim 16 on CPU": (
            [*math, "model.flavor=tiny-qwen-vocab", f"checkpoint.save={tmp_path / 'd'}"],
            "qmath: error: model.flavor=tiny-qwen-vocab has head_dim 16",
        ),
        "toy task without a save dir": (
            ["--recipe", "tiny_cpu_grpo", "checkpoint.save=null"],
            "qmath: error: rl.task=toy_half_vocab without rl.engine_model writes the engines' "
            "random start weights under checkpoint.save",
        ),
        "no SFT model": (
            ["--recipe", "tiny_cpu_grpo_math"],  # runs/ relative to the empty cwd
            "qmath: error: not found: rl.engine_model=runs/tiny_cpu_sft_math_hf",
        ),
    }
    payload = json.dumps([{"name": k, "argv": v[0]} for k, v in cases.items()])
    marker = tmp_path / "engine_started"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(marker), payload],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == list(cases)
    with capsys.disabled():
        print("\n`qmath train grpo` to its error, no engine started (the first case pays for")
        print("the imports of the training loop); seconds in the call, since process start:")
        for r in results:
            print(f"  {r['case']:<28} {r['seconds']:6.2f} s  {r['since_start']:6.1f} s")
    for r in results:
        expected = cases[r["case"]][1]
        assert r["rc"] == 1, r
        # Besides the log lines (time, level, logger): the error, one line, no traceback.
        lines = [
            line
            for line in r["stderr"].strip().splitlines()
            if not re.match(r"\d\d:\d\d:\d\d [A-Z]+ qmath_megatron\.", line)
        ]
        assert len(lines) == 1 and expected in lines[0], (r["case"], r["stderr"])
        assert r["seconds"] < 60, r  # the engines alone take longer to start
    assert not marker.exists(), marker.read_text()

"""`qmath eval` end to end (tiny random model, transformers engine, real sandbox and answer
checker), `qmath eval metrics` against hand-computed values, and input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_eval_metrics import RECORDS

QMATH = [sys.executable, "-m", "qmath_megatron"]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*QMATH, *args], capture_output=True, text=True, timeout=timeout)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_metrics_cli_matches_hand_computed_values(tmp_path):
    """The hand-worked records of test_eval_metrics, scored by the real answer checker:
    0.5 and \\frac{1}{2} must be found equal to the reference 1/2, and the wrong answers 4
    and \\frac{8}{2} equal to each other (maj@4 depends on both)."""
    samples = tmp_path / "run.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    proc = _run(
        [
            "eval",
            "metrics",
            "--samples",
            str(samples),
            "--k",
            "4",
            "--output",
            str(tmp_path / "m.json"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == {"greedy": 75.0, "pass@4": 100.0, "maj@4": 50.0, "rm@4": 50.0}
    details = _jsonl(tmp_path / "run.scored.jsonl")
    assert details[2]["answers"] == ["0.5", "3", "\\frac{1}{2}", "3"]
    assert details[2]["correct"] == [True, False, True, False]
    assert details[3]["classes"][1] == details[3]["classes"][2]
    # Without rm_scores rm@K is null; k defaults to the number of completions.
    bare = [{k: v for k, v in r.items() if k != "rm_scores"} for r in RECORDS]
    samples.write_text("".join(json.dumps(r) + "\n" for r in bare))
    proc = _run(
        ["eval", "metrics", "--samples", str(samples), "--output", str(tmp_path / "m2.json")]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "m2.json").read_text()) == {
        "greedy": 75.0,
        "pass@4": 100.0,
        "maj@4": 50.0,
        "rm@4": None,
    }


def test_eval_metrics_cli_input_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"gt": "1", "completions": ["a"]}\n{"gt": "1", "completions": "oops"}\n')
    proc = _run(["eval", "metrics", "--samples", str(bad)])
    assert proc.returncode == 1 and f"{bad}:2" in proc.stderr and "completions" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    short = tmp_path / "short.jsonl"
    short.write_text('{"gt": "1", "completions": ["a", "b"]}\n')
    proc = _run(["eval", "metrics", "--samples", str(short), "--k", "3"])
    assert proc.returncode == 1 and "fewer than k=3" in proc.stderr


class OracleEngine:
    """Answers each problem with its GSM8K reference (looked up by the problem text), so a
    correct pipeline must report 100%."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def generate(self, prompts, params):
        from qmath_megatron.inference.engine import Completion

        out = []
        for prompt in prompts:
            answer = next(a for q, a in self.answers.items() if q in prompt)
            text = f"We work it out step by step. The final answer is $\\boxed{{{answer}}}$."
            out.append([Completion(text, [0] * 7, None, "stop") for _ in range(params.n)])
        return out


def test_run_eval_scores_real_gsm8k_answers(tmp_path, tiny_instruct, shared_benchmark):
    from qmath_megatron.evaluation.benchmarks import load_problems, resolve_benchmarks
    from qmath_megatron.evaluation.config import EvalJob, EvalModelConfig, SamplingConfig
    from qmath_megatron.evaluation.runner import run_eval
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    bench = shared_benchmark("gsm8k").parents[1]
    (spec,) = resolve_benchmarks(["gsm8k"], bench)
    problems = load_problems(spec, limit=5)
    assert problems[0].reference == "18"  # Janet's ducks: the text after ####
    job = EvalJob(
        model=EvalModelConfig(path=str(tiny_instruct)),
        benchmarks=["gsm8k"],
        output=str(tmp_path / "out"),
        benchmark_dir=str(bench),
        limit=5,
        sampling=SamplingConfig(n=3, temperature=0.7),
    )
    engine = OracleEngine({p.problem: p.reference for p in problems})
    summary = run_eval(
        job, engine=engine, tokenizer=load_tokenizer(tiny_instruct), log=lambda m: None
    )
    assert summary["results"]["gsm8k/cot"] == {
        "greedy": 100.0,
        "pass@3": 100.0,
        "maj@3": 100.0,
        "rm@3": None,
    }
    rows = _jsonl(tmp_path / "out" / "gsm8k" / "cot" / "samples.jsonl")
    assert [r["gt"] for r in rows] == [p.reference for p in problems]
    assert all(len(r["completions"]) == 3 and "greedy" in r for r in rows)
    # The prompt is the Qwen2.5-Math CoT chat prompt.
    from qmath_megatron.evaluation.prompts import COT_SYSTEM_PROMPT, build_prompt

    prompt = build_prompt(load_tokenizer(tiny_instruct), problems[0].problem, "cot")
    assert prompt.startswith(
        f"<|im_start|>system\n{COT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    )
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _math500_style_dir(root: Path) -> Path:
    """A benchmark directory whose ``math500/test.jsonl`` has MATH-500's fields (the model is
    random, so the problems' text does not matter; the built-in loader's path does)."""
    rows = [
        ("What is $3 \\cdot 4$?", "12", "Prealgebra", 1),
        ("Simplify $\\frac{6}{8}$.", "\\frac{3}{4}", "Algebra", 2),
        ("Find $x$ if $2x + 1 = 7$.", "3", "Algebra", 1),
    ]
    path = root / "math500" / "test.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(
        "".join(
            json.dumps(
                {
                    "problem": problem,
                    "solution": f"Working it out gives $\\boxed{{{answer}}}$.",
                    "answer": answer,
                    "subject": subject,
                    "level": level,
                    "unique_id": f"test/{subject.lower()}/{i}.json",
                }
            )
            + "\n"
            for i, (problem, answer, subject, level) in enumerate(rows)
        )
    )
    return root


def test_qmath_eval_end_to_end_with_a_tiny_random_model(tmp_path, tiny_instruct):
    toy = tmp_path / "toy.jsonl"
    toy.write_text(
        "".join(
            json.dumps({"q": f"What is {a} + {b}?", "solution": f"{a}+{b}={a + b}\n#### {a + b}"})
            + "\n"
            for a, b in [(1, 2), (30, 12), (5, 5)]
        )
    )
    out = tmp_path / "out"
    args = [
        "eval",
        "--model",
        str(tiny_instruct),
        "--engine",
        "transformers",
        "--benchmarks",
        "math500",
        "--benchmark-dir",
        str(_math500_style_dir(tmp_path / "benchmarks")),
        "--benchmark",
        f"name=toy,path={toy},problem=q,answer=solution,format=gsm8k",
        "--modes",
        "cot,tir",
        "--limit",
        "2",
        "--n",
        "2",
        "--temperature",
        "0.9",
        "--max-new-tokens",
        "12",
        "--output",
        str(out),
        "--sandbox-workers",
        "2",
        "--check-workers",
        "1",
    ]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"math500/cot", "math500/tir", "toy/cot", "toy/tir"}
    assert summary["k"] == 2 and summary["sandbox"]["backend"] in ("bwrap", "rlimits")
    for run in summary["results"]:
        metrics = json.loads((out / run / "metrics.json").read_text())
        assert set(metrics) == {"greedy", "pass@2", "maj@2", "rm@2"} and metrics["rm@2"] is None
        assert all(0.0 <= v <= 100.0 for v in list(metrics.values())[:3])
        rows = _jsonl(out / run / "samples.jsonl")
        assert len(rows) == 2 and all(
            len(r["completions"]) == 2 and isinstance(r["greedy"], str) for r in rows
        )
        assert len(_jsonl(out / run / "scored.jsonl")) == 2
        # What `qmath eval` wrote, `qmath eval metrics` re-scores to the same numbers.
        again = _run(
            [
                "eval",
                "metrics",
                "--samples",
                str(out / run / "samples.jsonl"),
                "--output",
                str(tmp_path / "re.json"),
            ]
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert json.loads((tmp_path / "re.json").read_text()) == metrics
    toy_rows = _jsonl(out / "toy" / "cot" / "samples.jsonl")
    assert [r["gt"] for r in toy_rows] == ["3", "42"]
    assert "executions" in _jsonl(out / "toy" / "tir" / "samples.jsonl")[0]
    # A rerun reuses the saved samples; other sampling settings are refused.
    rerun = _run(args)
    assert rerun.returncode == 0 and rerun.stdout.count("reusing") == 4
    changed = _run([*args[:-2], "--output", str(out), "--temperature", "0.5"])
    assert changed.returncode == 1 and "--overwrite" in changed.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--benchmarks", "nope"], "unknown benchmark 'nope'"),
        (["--benchmarks", "gsm8k"], "--benchmark-dir"),
        (["--benchmarks", "toy", "--modes", "cot,pot"], "unknown evaluation mode"),
        (["--benchmarks", "toy", "--n", "4"], "temperature"),
    ],
)
def test_qmath_eval_input_errors(tmp_path, extra, message, monkeypatch, capsys):
    from qmath_megatron.cli import main

    monkeypatch.delenv("QMATH_BENCHMARK_DIR", raising=False)
    toy = tmp_path / "toy.jsonl"
    toy.write_text('{"q": "1+1?", "a": "2"}\n')
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path),
            "--output",
            str(out),
            "--benchmark",
            f"name=toy,path={toy},problem=q,answer=a",
            *extra,
        ]
    )
    assert rc == 1 and message in capsys.readouterr().err
    assert not out.exists()  # nothing is written for a refused run


def test_bad_benchmark_lines_and_models_are_named(tmp_path, capsys):
    from qmath_megatron.cli import main

    toy = tmp_path / "toy.jsonl"
    toy.write_text('{"q": "1+1?", "a": "2"}\n{"q": "2+2?"}\n')
    spec = f"name=toy,path={toy},problem=q,answer=a"
    out = tmp_path / "out"
    common = ["eval", "--benchmark", spec, "--output", str(out)]
    assert main([*common, "--model", str(tmp_path)]) == 1
    assert f"{toy}:2" in capsys.readouterr().err
    toy.write_text('{"q": "1+1?", "a": "2"}\n')
    assert main([*common, "--model", str(tmp_path)]) == 1
    assert "neither a Hugging Face model directory" in capsys.readouterr().err
    assert main([*common, "--model", str(tmp_path / "missing")]) == 1
    assert "model not found" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


class ScriptedEngine:
    """Known completions per problem: the hand-worked RECORDS for sampled calls, and a
    scripted greedy completion for temperature-0 calls; records every call's parameters."""

    def __init__(self, sampled: dict[str, list[str]], greedy: dict[str, str]):
        self.sampled, self.greedy, self.calls = sampled, greedy, []

    def generate(self, prompts, params):
        from qmath_megatron.inference.engine import Completion

        self.calls.append((len(prompts), params.n, params.temperature))
        out = []
        for prompt in prompts:
            key = next(q for q in self.sampled if f"\n{q}<|im_end|>" in prompt)
            texts = [self.greedy[key]] if params.temperature == 0 else self.sampled[key]
            assert len(texts) == params.n
            out.append([Completion(t, [0] * 5, None, "stop") for t in texts])
        return out


class ScriptedScorer:
    """A reward model stand-in: the hand-worked rm_scores, looked up by problem text."""

    def __init__(self, scores: dict[str, list[float]]):
        self.scores = scores

    def score(self, problems, completions):
        return [self.scores[p] for p in problems]


def test_run_eval_with_a_scripted_engine_equals_hand_computed_metrics(tmp_path, tiny_instruct):
    """Prompts -> engine -> samples -> real answer checker -> metrics, with known completions.

    Sampled completions and rm scores are the hand-worked RECORDS (maj@4 50, rm@4 50,
    pass@4 100, see test_eval_metrics); the separate greedy pass answers problems 0 and 2
    right and 1 and 3 wrong, so greedy is 50 (the first samples alone would give 75).
    """
    from qmath_megatron.evaluation.config import (
        CheckConfig,
        EvalJob,
        EvalModelConfig,
        SamplingConfig,
    )
    from qmath_megatron.evaluation.runner import run_eval
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    questions = [f"Scripted problem number {i}?" for i in range(len(RECORDS))]
    bench = tmp_path / "scripted.jsonl"
    bench.write_text(
        "".join(json.dumps({"q": q, "a": r["gt"]}) + "\n" for q, r in zip(questions, RECORDS))
    )
    greedy_answers = [RECORDS[0]["gt"], "6", "0.5", "4"]
    engine = ScriptedEngine(
        {q: r["completions"] for q, r in zip(questions, RECORDS)},
        {q: f"So the answer is $\\boxed{{{a}}}$." for q, a in zip(questions, greedy_answers)},
    )
    scorer = ScriptedScorer({q: r["rm_scores"] for q, r in zip(questions, RECORDS)})
    job = EvalJob(
        model=EvalModelConfig(path=str(tiny_instruct)),
        benchmarks=["scripted"],
        benchmark_specs=[f"name=scripted,path={bench},problem=q,answer=a"],
        output=str(tmp_path / "out"),
        sampling=SamplingConfig(n=4, temperature=0.7),
        k=4,
        check=CheckConfig(workers=1),
    )
    summary = run_eval(
        job,
        engine=engine,
        tokenizer=load_tokenizer(tiny_instruct),
        scorer=scorer,
        log=lambda m: None,
    )
    expected = {"greedy": 50.0, "pass@4": 100.0, "maj@4": 50.0, "rm@4": 50.0}
    assert summary["results"]["scripted/cot"] == expected
    assert engine.calls == [(4, 4, 0.7), (4, 1, 0.0)]  # one sampled pass, one greedy pass
    run = tmp_path / "out" / "scripted" / "cot"
    assert json.loads((run / "metrics.json").read_text()) == expected
    rows = _jsonl(run / "samples.jsonl")
    assert [r["rm_scores"] for r in rows] == [r["rm_scores"] for r in RECORDS]
    assert [r["completions"] for r in rows] == [r["completions"] for r in RECORDS]
    scored = _jsonl(run / "scored.jsonl")
    assert [d["greedy_correct"] for d in scored] == [True, False, True, False]
    assert [d["maj_correct"] for d in scored] == [True, False, True, False]
    assert [d["rm_index"] for d in scored] == [1, 2, 0, 2]
    # The saved samples re-score to the same numbers without the model.
    proc = _run(
        [
            "eval",
            "metrics",
            "--samples",
            str(run / "samples.jsonl"),
            "--k",
            "4",
            "--output",
            str(tmp_path / "re.json"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "re.json").read_text()) == expected
    # The same run reuses its samples; a benchmark file edited under the same path (same
    # size, mtime kept) is not reused: generation.json holds the content fingerprint the
    # data tools use (data/shards.py).
    again = run_eval(
        job,
        engine=engine,
        tokenizer=load_tokenizer(tiny_instruct),
        scorer=scorer,
        log=lambda m: None,
    )
    assert again["results"]["scripted/cot"] == expected and len(engine.calls) == 2
    st = bench.stat()
    bench.write_text(bench.read_text().replace("number 0", "number 9"))
    os.utime(bench, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="other settings \\(benchmark_file"):
        run_eval(
            job,
            engine=engine,
            tokenizer=load_tokenizer(tiny_instruct),
            scorer=scorer,
            log=lambda m: None,
        )


def test_run_eval_tir_answers_from_the_real_execution_output(tmp_path, tiny_instruct):
    """TIR through run_eval with the real sandbox: the scripted model writes a program and
    hallucinates a wrong output after it; it boxes whatever output it is given. Only the
    sandbox's real output (12345 * 6789 = 83810205) makes the answer right."""
    from qmath_megatron.evaluation.config import CheckConfig, EvalJob, EvalModelConfig
    from qmath_megatron.evaluation.runner import run_eval
    from qmath_megatron.inference.engine import Completion, first_stop
    from qmath_megatron.sandbox import SandboxConfig, SandboxExecutor
    from qmath_megatron.tokenizer.qwen import load_tokenizer

    class CodeWritingEngine:
        def generate(self, prompts, params):
            out = []
            for prompt in prompts:
                if "```output\n" in prompt:
                    value = prompt.rsplit("```output\n", 1)[1].split("\n", 1)[0]
                    text = f"The program printed {value}, so the answer is $\\boxed{{{value}}}$."
                else:
                    text = "```python\nprint(12345 * 6789)\n```\n```output\n83810000\n```\n"
                hit = first_stop(text, params.stop)
                cut = (text[: hit[0]], hit[1]) if hit else (text, None)
                out.append([Completion(cut[0], [0] * 4, None, "stop", cut[1])])
            return out

    bench = tmp_path / "tir.jsonl"
    bench.write_text(json.dumps({"q": "What is 12345 times 6789?", "a": "83810205"}) + "\n")
    job = EvalJob(
        model=EvalModelConfig(path=str(tiny_instruct)),
        benchmarks=["tir"],
        modes=["tir"],
        benchmark_specs=[f"name=tir,path={bench},problem=q,answer=a"],
        output=str(tmp_path / "out"),
        check=CheckConfig(workers=1),
    )
    with SandboxExecutor(SandboxConfig(workers=1)) as executor:
        summary = run_eval(
            job,
            engine=CodeWritingEngine(),
            tokenizer=load_tokenizer(tiny_instruct),
            executor=executor,
            log=lambda m: None,
        )
    assert summary["results"]["tir/tir"]["greedy"] == 100.0
    (row,) = _jsonl(tmp_path / "out" / "tir" / "tir" / "samples.jsonl")
    (executions,) = row["executions"]
    assert [(e["code"], e["status"], e["output"]) for e in executions] == [
        ("print(12345 * 6789)", "ok", "83810205")
    ]
    assert "83810000" not in row["completions"][0]  # the hallucinated output was replaced


def test_generator_chunks_for_transformers_and_sends_everything_to_vllm(tiny_instruct):
    """vLLM gets all prompts in one call (it batches itself); the transformers engine gets
    chunks with a progress line after each."""
    from qmath_megatron.evaluation.config import EvalJob, EvalModelConfig
    from qmath_megatron.evaluation.runner import Generator
    from qmath_megatron.inference.engine import Completion

    class Counting:
        def __init__(self):
            self.sizes = []

        def generate(self, prompts, params):
            self.sizes.append(len(prompts))
            return [[Completion("x", [0], None, "stop")] for _ in prompts]

    job = EvalJob(model=EvalModelConfig(path=str(tiny_instruct)), benchmarks=["b"])
    prompts = [f"p{i}" for i in range(5)]
    for chunk_size, sizes in [(None, [5]), (2, [2, 2, 1])]:
        engine, lines = Counting(), []
        samples, greedy = Generator(
            engine, job, (), log=lines.append, chunk_size=chunk_size
        ).generate(prompts, "cot")
        assert engine.sizes == sizes and len(samples) == 5 and greedy is None
        assert len(lines) == len(sizes) and lines[-1].startswith("  generated 5/5")

"""`qmath eval --rm`: samples generated without a reward model get rm@k when reused with one."""

from __future__ import annotations

import json

from tests.unit.test_eval_metrics import RECORDS
from tests.unit.test_eval_pipeline import ScriptedEngine, ScriptedScorer


def test_reused_samples_are_scored_by_a_later_reward_model(tmp_path, tiny_instruct):
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
    engine = ScriptedEngine(
        {q: r["completions"] for q, r in zip(questions, RECORDS)},
        {q: "\\boxed{0}" for q in questions},
    )
    job = EvalJob(
        model=EvalModelConfig(path=str(tiny_instruct)),
        benchmarks=["scripted"],
        benchmark_specs=[f"name=scripted,path={bench},problem=q,answer=a"],
        output=str(tmp_path / "out"),
        sampling=SamplingConfig(n=4, temperature=0.7),
        k=4,
        check=CheckConfig(workers=1),
    )
    tok = load_tokenizer(tiny_instruct)
    first = run_eval(job, engine=engine, tokenizer=tok, log=lambda m: None)
    assert first["results"]["scripted/cot"]["rm@4"] is None  # no reward model yet
    scorer = ScriptedScorer({q: r["rm_scores"] for q, r in zip(questions, RECORDS)})
    again = run_eval(job, engine=engine, tokenizer=tok, scorer=scorer, log=lambda m: None)
    assert len(engine.calls) == 2  # nothing generated again
    assert again["results"]["scripted/cot"]["rm@4"] == 50.0  # the hand-worked RECORDS value
    rows = [
        json.loads(x)
        for x in (tmp_path / "out/scripted/cot/samples.jsonl").read_text().splitlines()
    ]
    assert [r["rm_scores"] for r in rows] == [r["rm_scores"] for r in RECORDS]

"""``qmath pipeline``: the DAG, command lines, state, resume, refusals and executors, on a
small pipeline of fast real commands (``qmath data generate`` -> ``qmath data dedup``).
The tiny recipe's whole loop runs in tests/distributed/test_pipeline_tiny.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qmath_megatron.pipeline.executors import ExecutorConfig, LocalExecutor, sbatch_script
from qmath_megatron.pipeline.plan import make_plan
from qmath_megatron.pipeline.recipes import RECIPES, get_pipeline
from qmath_megatron.pipeline.report import collect_status, write_report
from qmath_megatron.pipeline.stage import Pipeline, Resources, Stage, render_settings
from qmath_megatron.pipeline.state import MARKER, RunState, read_marker, stage_is_running


def small_pipeline(n: int = 40, threshold: float = 0.8) -> Pipeline:
    """problems (generate) -> dedup (reads problems' file) ; extra (generate, independent)."""
    return Pipeline(
        "test",
        [
            Stage(
                "problems",
                "data",
                ("data", "generate"),
                {"kind": "toy-problems", "n": n, "seed": 1, "output": "{self.file}"},
                outputs={"file": "problems.jsonl"},
            ),
            Stage(
                "dedup",
                "data",
                ("data", "dedup"),
                {
                    "input": "{problems.file}",
                    "output": "{self.out}",
                    "text_key": "problem",
                    "threshold": threshold,
                },
                outputs={"out": "out"},
                resumable=True,
                metrics="out/report.json",
            ),
            Stage(
                "extra",
                "data",
                ("data", "generate"),
                {"kind": "toy-sft", "n": 3, "output": "{self.file}"},
                outputs={"file": "sft.jsonl"},
            ),
        ],
    )


def run_local(pipeline: Pipeline, run: Path, **kw) -> int:
    from qmath_megatron.pipeline.cli import _record_run

    plan = make_plan(pipeline, run, {}, **kw)
    _record_run(pipeline, run, {}, "local")
    return LocalExecutor(ExecutorConfig(), log=lambda m: None).run(plan)


def test_settings_render_as_flags_and_overrides():
    words = render_settings(
        {
            "recipe": "tiny_cpu_sft",
            "input": ["a.jsonl", "b.jsonl"],
            "max_new_tokens": 24,
            "truncate": True,
            "json": False,
            "scorer": None,
            "train.train_iters": 5,
            "data.blend": ["x"],
        }
    )
    assert words == [
        "--recipe",
        "tiny_cpu_sft",
        "--input",
        "a.jsonl",
        "b.jsonl",
        "--max-new-tokens",
        "24",
        "--truncate",
        "train.train_iters=5",
        'data.blend=["x"]',
    ]


def test_placeholders_resolve_through_the_dag(tmp_path):
    p = small_pipeline()
    assert p.stages["dedup"].upstream() == ["problems"]
    assert p.downstream("problems") == ["problems", "dedup"]
    argv = p.argv(tmp_path, "dedup")
    assert argv[:6] == [
        *("data", "dedup", "--input", str(tmp_path / "problems/problems.jsonl")),
        *("--output", str(tmp_path / "dedup/out")),
    ]
    with pytest.raises(ValueError, match="stage a reads {nope...}: no such stage"):
        Pipeline("x", [Stage("a", "data", ("data", "generate"), {"output": "{nope.file}"})])
    with pytest.raises(ValueError, match="has outputs"):
        Pipeline(
            "x",
            [
                Stage("a", "data", ("data", "generate"), {}, outputs={"file": "f"}),
                Stage("b", "data", ("data", "dedup"), {"input": "{a.missing}"}),
            ],
        )
    with pytest.raises(ValueError, match="STAGE.KEY=VALUE"):
        p.apply_overrides({"nosuch.n": 3})


def test_every_recipe_builds_a_valid_dag_with_the_four_evaluated_models():
    for name in RECIPES:
        p = get_pipeline(name)
        models = [s.model for s in p.stages.values() if s.kind == "eval"]
        assert models == ["base", "sft1", "sft2", "grpo"], name
        # SFT2 starts from the base checkpoint; GRPO from SFT2 with the final RM (RM2).
        assert (
            p.stages["sft2"].settings["model.init_from"]
            == p.stages["sft1"].settings["model.init_from"]
        )
        g = p.stages["grpo"].settings
        assert g["model.init_from"] == "{sft2.ckpt}" and g["rl.rm_model"] == "{rm2_hf.hf}"
        assert p.stages["rft"].settings["scorer"] == "{rm1_hf.hf}"
        # rm@k of every model uses the final RM; RL prompts come from SFT2's samples alone.
        assert {"grpo", "eval_base", "eval_sft1"} <= set(p.downstream("rm2"))
        assert "rl_prompts" not in p.downstream("rm2") and "rl_prompts" in p.downstream("sft2")


def test_local_run_skips_done_stages_and_refuses_changes(tmp_path):
    run = tmp_path / "run"
    assert run_local(small_pipeline(), run) == 0
    for name in ("problems", "dedup", "extra"):
        assert read_marker(run, name) is not None
    report = json.loads((run / "dedup/out/report.json").read_text())
    marker = read_marker(run, "dedup")
    numeric = {k: v for k, v in report.items() if isinstance(v, int | float) and v is not True}
    assert numeric and marker["metrics"] == {k: v for k, v in numeric.items() if v is not False}
    assert (
        marker["fingerprint"]["inputs"]["problems"]
        == read_marker(run, "problems")["outputs_fingerprint"]
    )
    logs = {n: (run / n / "log.txt").read_text() for n in ("problems", "dedup")}

    # The same command again runs nothing.
    plan = make_plan(small_pipeline(), run, {})
    assert plan.todo == [] and plan.done == ["problems", "dedup", "extra"]
    assert run_local(small_pipeline(), run) == 0
    assert {n: (run / n / "log.txt").read_text() for n in logs} == logs

    # A changed setting is refused, naming stage.key: old -> new ...
    with pytest.raises(ValueError, match=r"dedup\.threshold: 0\.8 -> 0\.7"):
        make_plan(small_pipeline(threshold=0.7), run, {})
    # ... as is an upstream output changed by hand (both the stage and its reader).
    f = run / "problems/problems.jsonl"
    f.write_text(f.read_text() + json.dumps({"id": "x", "problem": "new", "answer": "1"}) + "\n")
    with pytest.raises(ValueError) as err:
        make_plan(small_pipeline(), run, {})
    assert "problems: its outputs changed after it finished" in str(err.value)

    # --from reruns the stage and everything downstream; the old outputs are set aside.
    plan = make_plan(small_pipeline(n=30), run, {}, from_stage="problems")
    assert plan.todo == ["problems", "dedup"] and plan.done == ["extra"]
    assert run_local(small_pipeline(n=30), run, from_stage="problems") == 0
    assert (run / ".previous/problems/problems.jsonl").is_file()
    assert len((run / "problems/problems.jsonl").read_text().splitlines()) == 30
    assert make_plan(small_pipeline(n=30), run, {}).todo == []


def test_failed_stage_stops_the_run_and_names_its_log(tmp_path, capsys):
    run = tmp_path / "run"
    bad = small_pipeline()
    bad.apply_overrides({"dedup.threshold": 7.5})  # refused by dedup itself
    from qmath_megatron.pipeline.cli import _record_run

    plan = make_plan(bad, run, {})
    _record_run(bad, run, {}, "local")
    lines: list[str] = []
    assert LocalExecutor(ExecutorConfig(), log=lines.append).run(plan) == 1
    message = "\n".join(lines)
    assert "stage dedup failed" in message and "threshold" in message
    assert f"log: {run / 'dedup' / 'log.txt'}" in message and "not started: extra" in message
    assert read_marker(run, "dedup") is None and not (run / "extra").exists()
    status = collect_status(run)
    states = {s["name"]: s["state"] for s in status["stages"]}
    assert states == {"problems": "done", "dedup": "failed", "extra": "pending"}
    failed = next(s for s in status["stages"] if s["name"] == "dedup")
    assert "threshold" in failed["error"]


def test_stage_killed_mid_run_resumes_on_rerun(tmp_path):
    """kill -9 of the pipeline while a stage runs: status says the stage is not running any
    more, the rerun completes it and the outputs equal an uninterrupted run's."""
    run = tmp_path / "run"
    ref = tmp_path / "ref"
    assert run_local(small_pipeline(n=3000), ref) == 0
    root = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; from pathlib import Path; sys.path.insert(0, {root!r});"
        "from tests.unit.test_pipeline import small_pipeline, run_local;"
        f"run_local(small_pipeline(n=3000), Path({str(run)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "dedup" / "log.txt").exists():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The stage's command got SIGTERM from the kernel when its parent died; until it has
    # exited the stage still counts as running (it holds the stage's lock).
    deadline = time.time() + 60
    while stage_is_running(run, "dedup") and time.time() < deadline:
        time.sleep(0.1)
    assert read_marker(run, "dedup") is None
    states = {s["name"]: (s["state"], s["error"]) for s in collect_status(run)["stages"]}
    assert states["problems"][0] == "done"
    assert states["dedup"][0] == "failed" and "interrupted" in states["dedup"][1]
    assert run_local(small_pipeline(n=3000), run) == 0
    for rel in ("problems/problems.jsonl", "dedup/out/kept/problems.jsonl", "extra/sft.jsonl"):
        assert (run / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_status_json_and_report(tmp_path):
    run = tmp_path / "run"
    assert run_local(small_pipeline(), run) == 0
    out = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "pipeline", "status", str(run), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert [s["name"] for s in status["stages"]] == ["problems", "dedup", "extra"]
    assert all(s["state"] == "done" and s["seconds"] > 0 for s in status["stages"])
    assert status["eval"] == {} and "outputs" in status["stages"][1]
    report, plots = write_report(run)
    assert "| dedup | done |" in report.read_text()


def test_slurm_scripts_chain_with_afterok_and_requeue_training(tmp_path):
    p = get_pipeline("tiny_cpu")
    plan = make_plan(p, tmp_path, {})
    sft1 = sbatch_script(plan, p.stages["sft1"], ExecutorConfig(slurm_partition="debug"))
    assert "#SBATCH --requeue" in sft1 and "#SBATCH --signal=B:USR1@300" in sft1
    assert "#SBATCH --partition=debug" in sft1
    assert "pipeline run-stage --workdir" in sft1 and "--stage sft1" in sft1
    data = sbatch_script(plan, p.stages["sft_data"], ExecutorConfig())
    assert "--requeue" not in data
    cmd = ["pipeline", "run", "--recipe", "tiny_cpu", "--workdir", str(tmp_path / "r")]
    out = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", *cmd, "--executor", "slurm", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    chained = "sft1/job.sbatch (sbatch --dependency=afterok on tokenizer, base, sft_data)"
    assert chained in out.stderr
    assert not (tmp_path / "r" / "pipeline.json").exists()  # a dry run writes nothing


def test_resources_are_checked():
    with pytest.raises(ValueError):
        Resources(nodes=0)


def test_state_file_is_updated_under_a_lock(tmp_path):
    state = RunState(tmp_path)
    state.set_stage("a", state="running")
    state.set_stage("a", seconds=1.5)
    assert state.read()["stages"]["a"] == {"state": "running", "seconds": 1.5}
    assert MARKER == "stage.json"


def test_scale_recipes_need_their_inputs_and_dry_run_prints_the_whole_plan(tmp_path):
    cmd = [sys.executable, "-m", "qmath_megatron", "pipeline", "run", "--recipe"]
    run = ["--workdir", str(tmp_path / "r")]
    refused = subprocess.run([*cmd, "qwen25_math_72b", *run], capture_output=True, text=True)
    assert refused.returncode == 1
    assert "needs its inputs: set inputs.base_hf=PATH inputs.sft_data=PATH" in refused.stderr
    plan = subprocess.run(
        [*cmd, "qwen25_math_72b", *run, "--executor", "slurm", "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert plan.stderr.count("#!/bin/bash") == len(get_pipeline("qwen25_math_72b").stages)
    sft1 = plan.stderr.split("/sft1/job.sbatch")[1].split("# ----")[0]
    assert "#SBATCH --nodes=4" in sft1 and "#SBATCH --gpus-per-node=8" in sft1
    p = get_pipeline("qwen25_math_72b")
    p.apply_overrides({"inputs.base_hf": "/models/base"})
    assert p.resolve(tmp_path, "base")["hf"] == "/models/base"
    assert p.argv(tmp_path, "eval_base")[1:3] == ["--model", "/models/base"]
    with pytest.raises(ValueError, match="no input 'nope'"):
        p.apply_overrides({"inputs.nope": "x"})


def test_nemo_run_executor_runs_the_dag_locally(tmp_path):
    from qmath_megatron.pipeline.cli import _record_run
    from qmath_megatron.pipeline.executors import NemoRunExecutor

    run = tmp_path / "run"
    p = small_pipeline()
    plan = make_plan(p, run, {})
    _record_run(p, run, {}, "nemo-run")
    assert NemoRunExecutor(ExecutorConfig(), log=lambda m: None).run(plan) == 0
    assert all(read_marker(run, n) is not None for n in ("problems", "dedup", "extra"))
    assert (run / ".nemo_run" / "experiments").is_dir()  # nemo-run's records stay in the run
    ref = tmp_path / "ref"
    assert run_local(small_pipeline(), ref) == 0
    kept = "dedup/out/kept/problems.jsonl"
    assert (run / kept).read_bytes() == (ref / kept).read_bytes()


def test_a_restarted_stage_keeps_its_lock_while_its_directory_is_cleared(tmp_path):
    """A stage that does not resume itself starts from an empty directory, but the lock its
    attempt holds stays (status must see the stage running)."""
    from qmath_megatron.pipeline.runner import LOG, clear_stage_dir
    from qmath_megatron.pipeline.state import stage_lock

    (tmp_path / "s" / "old").mkdir(parents=True)
    (tmp_path / "s" / LOG).write_text("earlier attempt\n")
    with stage_lock(tmp_path, "s"):
        clear_stage_dir(tmp_path, "s")
        assert stage_is_running(tmp_path, "s")
        assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [".lock", LOG]
    assert not stage_is_running(tmp_path, "s")

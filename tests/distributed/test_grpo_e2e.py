"""GRPO end to end on CPU with real vLLM, beyond the toy learning curve (test_grpo.py):

- resume: a run resumed from its step-2 checkpoint reproduces the uninterrupted run's
  step 3 exactly, and the weight version keeps counting from the checkpoint;
"""

from __future__ import annotations

import json
import shutil

from qmath_megatron.parallel.runtime import launch

STEP_KEYS = ("loss", "grad_norm", "reward", "accuracy", "entropy", "kl", "clip_fraction",
             "logprob_mismatch", "logprob_mismatch_max", "response_length", "weight_version",
             "engine_weight_version_min", "engine_weight_version_max")  # fmt: skip


def _grpo(recipe: str, overrides: list[str], spy: bool = False) -> dict:
    from tests.distributed.rl_e2e_workers import grpo_run

    return launch(grpo_run, 1, recipe, overrides, spy)[0]


def _rows(save) -> dict[int, dict]:
    with open(save / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in rows if "reward" in r}


def test_resume_reproduces_the_uninterrupted_step(tmp_path):
    full = tmp_path / "full"
    _grpo("tiny_cpu_grpo", [f"checkpoint.save={full}", "checkpoint.save_interval=2",
                            "train.train_iters=3"])  # fmt: skip
    ref = _rows(full)
    assert sorted(ref) == [1, 2, 3] and [ref[i]["weight_version"] for i in (1, 2, 3)] == [1, 2, 3]
    # The run stopped after step 2: its checkpoint is the step-2 save (the same save call
    # whether or not the run goes on), alone in a fresh directory, so the rerun resumes it.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "iter_0000002", part / "iter_0000002")
    (part / "latest_checkpointed_iteration.txt").write_text("2\n")
    out = _grpo("tiny_cpu_grpo", [f"checkpoint.save={part}", "checkpoint.save_interval=2",
                                  "train.train_iters=3"])  # fmt: skip
    resumed = {h["iteration"]: h for h in out["history"]}
    assert sorted(resumed) == [3]
    # Same weights pushed to a fresh engine, same prompts and request seeds, same RNG: the
    # same rollouts and so the same numbers, bit for bit.
    for key in STEP_KEYS:
        assert resumed[3][key] == ref[3][key], (key, resumed[3][key], ref[3][key])
    assert resumed[3]["reward"] != ref[2]["reward"] or resumed[3]["loss"] != ref[2]["loss"]

"""Spawned-rank workers of the GRPO end-to-end tests (importable for spawn)."""

from __future__ import annotations

from typing import Any


def grpo_run(
    recipe: str, overrides: list[str], spy: bool = False, flavors: list[dict] | None = None
) -> dict[str, Any]:
    """`qmath train grpo --recipe RECIPE OVERRIDES` inside a spawned rank.

    Returns the logged history and this rank's last trained batch (tokens, loss mask, ...);
    with ``spy`` also what the rewards were computed from at every step (the problems, the
    responses' text and the verifier verdicts), recorded by wrapping the reward composition
    where the rollouts call it (``rl.rollout.compose_rewards``).
    ``flavors``: test-only architectures (QwenFlavor dicts) registered by name first."""
    from qmath_megatron.models.flavors import FLAVORS, QwenFlavor
    from qmath_megatron.rl import rollout
    from qmath_megatron.training.cli import load_stage, resolve_job
    from qmath_megatron.training.loop import train

    for f in flavors or []:
        FLAVORS[f["name"]] = QwenFlavor(**f)
    calls: list[dict] = []
    if spy:
        real = rollout.compose_rewards

        def recording(verdict, problems, groups, scorer=None, alpha=0.5):
            rewards, metrics = real(verdict, problems, groups, scorer, alpha)
            calls.append(
                {
                    "verdict": verdict.tolist(),
                    "problems": problems,
                    "texts": [[c.text for c in g] for g in groups],
                    "executions": [
                        [[(e.code, e.status, e.output) for e in c.executions] for c in g]
                        for g in groups
                    ],
                    "rewards": rewards.tolist(),
                    "metrics": metrics,
                }
            )
            return rewards, metrics

        rollout.compose_rewards = recording
    job = resolve_job(recipe, None, overrides, "grpo")
    task = load_stage("grpo").task(job)
    history = train(job, task)
    # Plain lists: tensors would travel as shared-memory handles that die with this process.
    samples = {k: v.tolist() for k, v in task.samples.items()}
    return {"history": history, "samples": samples, "rewards": calls}

"""GRPO end to end on CPU with real vLLM (``tiny_cpu_grpo``: the toy task "first sampled
token in the lower half of the vocabulary"): the mean reward rises to >= 0.9 (one external
engine started by ``qmath engine serve`` and found through its handle file), and falls with
the advantages' sign flipped (two colocated engines started by the trainer, each synced and
used every step); a resume from the rising run's step-8 checkpoint reproduces its steps 9
and 10 exactly; and one GRPO step at TP=2 equals TP=1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from qmath_megatron.parallel.runtime import launch

KEYS = (
    "reward",
    "accuracy",
    "response_length",
    "kl",
    "clip_fraction",
    "entropy",
    "logprob_mismatch",
    "sync_s",
    "rollout_s",
    "train_s",
    "tokens_per_s_per_gpu",
)


def _run(tmp_path, sign: int, iters: int, *extra: str) -> list[dict]:
    from tests.distributed.rl_workers import grpo_worker

    save = tmp_path / f"run{sign}"
    launch(
        grpo_worker,
        1,
        [
            f"checkpoint.save={save}",
            f"rl.advantage_sign={sign}",
            f"train.train_iters={iters}",
            *extra,
        ],
    )
    with open(save / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "reward" in r]


def _serve(model_dir, handle_dir, log) -> subprocess.Popen:
    """`qmath engine serve` of the toy model: the trainer's own engine settings (seed 1 like
    tiny_cpu_grpo's train.seed, max_model_len = seq_length + 8, no tokenizer)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "engine",
            "serve",
            "--model",
            str(model_dir),
            "--handle-dir",
            str(handle_dir),
            "--seed",
            "1",
            "--max-model-len",
            "24",
            "--skip-tokenizer-init",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_reward_rises_and_falls_with_the_sign_flipped(tmp_path, toy_hf):
    from qmath_megatron.inference.serve import handle_files, read_handle_file

    # The rising run uses an external engine: started here (its start-up overlaps the
    # trainer's), found by rank 0 through its handle file; the trainer starts none.
    handle_dir = tmp_path / "engines"
    with open(tmp_path / "serve.log", "wb") as log:
        server = _serve(toy_hf, handle_dir, log)
    try:
        up = _run(
            tmp_path,
            1,
            10,
            f"rl.engine_handles={handle_dir}",
            "rl.engine_handles_timeout_s=300",
            "checkpoint.save_interval=8",
        )
        # The trainer disconnected without stopping the engine: it still answers, holding
        # the last step's weights.
        (path,) = handle_files(handle_dir)
        assert path.stat().st_mode & 0o777 == 0o600
        client = read_handle_file(path).connect()
        assert client.weight_version() == 10
        client.close()
        server.send_signal(signal.SIGTERM)  # clean stop: the handle file goes first
        assert server.wait(timeout=60) == 0
        assert handle_files(handle_dir) == []
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log_text = (tmp_path / "serve.log").read_text(errors="replace")
    assert "removed" in log_text and "engine stopped" in log_text
    assert len(up) == 10 and all(k in up[0] for k in KEYS)
    assert [r["weight_version"] for r in up] == list(range(1, 11))  # a sync every step
    rewards = [r["reward"] for r in up]
    assert 0.3 <= rewards[0] <= 0.75  # a random model: near 50%
    assert max(rewards) >= 0.9 and sum(rewards[-3:]) / 3 >= 0.9, rewards
    # Same weights on both sides: the engine samples what the trainer computes.
    assert all(abs(r["logprob_mismatch"] - 1.0) < 1e-3 for r in up)
    assert up[-1]["entropy"] < up[0]["entropy"]
    assert all(r["engines"] == 1 for r in up)
    _check_resume(tmp_path, up)
    # The flipped run also shows two engines (colocated placement: on CPU, processes beside
    # the trainer without sleep/wake), each synced every step and each used every step.
    down = _run(tmp_path, -1, 8, "rl.engines=2", "rl.placement=colocated")
    assert all(r["engines"] == 2 and r["sleep_wake_s"] < 1.0 for r in down)  # no sleep on CPU
    assert [(r["engine_weight_version_min"], r["engine_weight_version_max"]) for r in down] == [
        (v, v) for v in range(1, 9)
    ]
    # Both engines' samples match the trainer (the max runs over every sampled token).
    assert all(abs(r["logprob_mismatch_max"] - 1.0) < 1e-3 for r in down)
    flipped = [r["reward"] for r in down]
    # The same start (seeded model, engine and prompts): the split over two engines keeps
    # every prompt's request seed, so it samples exactly what one engine did.
    assert flipped[0] == rewards[0]
    assert sum(flipped[-3:]) / 3 <= 0.2, flipped


RESUME_KEYS = (
    "loss",
    "grad_norm",
    "reward",
    "accuracy",
    "entropy",
    "kl",
    "clip_fraction",
    "logprob_mismatch",
    "logprob_mismatch_max",
    "response_length",
    "weight_version",
    "engine_weight_version_min",
    "engine_weight_version_max",
)


def _check_resume(tmp_path, up: list[dict]) -> None:
    """The rising run stopped after its step-8 save and resumed (with an engine the trainer
    starts this time: the engine layout is a safe change) reproduces steps 9 and 10 bit for
    bit, and the weight version keeps counting from the checkpoint (9, 10; not 1, 2)."""
    part = tmp_path / "resumed"
    part.mkdir()
    # The same save call whether or not the run goes on: the step-8 checkpoint alone.
    shutil.copytree(tmp_path / "run1" / "iter_0000008", part / "iter_0000008")
    (part / "latest_checkpointed_iteration.txt").write_text("8\n")
    from tests.distributed.rl_workers import grpo_worker

    launch(
        grpo_worker,
        1,
        [f"checkpoint.save={part}", "checkpoint.save_interval=8", "train.train_iters=10"],
    )
    with open(part / "metrics.jsonl") as f:
        resumed = [r for r in map(json.loads, f) if "reward" in r]
    assert [r["iteration"] for r in resumed] == [9, 10]
    for got, ref in zip(resumed, up[8:], strict=True):
        assert got["iteration"] == ref["iteration"]
        for key in RESUME_KEYS:
            assert got[key] == ref[key], (got["iteration"], key, got[key], ref[key])
    assert [r["weight_version"] for r in resumed] == [9, 10]


@pytest.fixture(scope="module")
def toy_hf(tmp_path_factory):
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model

    return make_random_hf_model(get_flavor("tiny-rl-toy"), tmp_path_factory.mktemp("toy") / "hf")


def test_tp2_loss_and_grad_norm_equal_tp1(toy_hf):
    from tests.distributed.rl_workers import grpo_tp_worker

    gen = torch.Generator().manual_seed(0)
    n, seq = 8, 12
    tokens = torch.randint(0, 64, (n, seq + 1), generator=gen)
    mask = torch.zeros(n, seq)
    mask[:, 6:] = 1.0
    mask[1, 9:] = 0.0  # responses of different lengths
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": mask,
        "position_ids": torch.arange(seq).expand(n, seq),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 1.5]),
        # far from the model's log-probs, so both clips and the TIS cap are hit
        "old_logprobs": -4.0 - torch.rand(n, seq, generator=gen),
        "behaviour_logprobs": -4.0 - torch.rand(n, seq, generator=gen),
    }
    ((l1, g1, r1),) = launch(grpo_tp_worker, 1, str(toy_hf), 1, batch)
    l2, g2, r2 = launch(grpo_tp_worker, 2, str(toy_hf), 2, batch)[0]
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6) and g1 == pytest.approx(g2, rel=1e-5)
    assert g1 > 0 and 0 < r1["clip_fraction"] < 1 and r1["tis_capped"] > 0
    assert r1["entropy"] == pytest.approx(r2["entropy"], rel=1e-5)

"""`qmath train sft` on the shared loop (CPU, gloo): the loss falls on a small repeated set
and the checkpoint exports to a transformers-loadable model; TP=2 and DP=2 equal TP=1
with the same global batch; SIGTERM to a torchrun job at TP=2 saves the current
iteration and exits 0, and the resumed run continues with exactly the uninterrupted
losses."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from qmath_megatron.parallel.runtime import free_port, launch
from tests.distributed.train_workers import sft_worker

pytestmark = pytest.mark.distributed
ITERS = 16
SEQ = 160  # one generated conversation (<= 133 tokens) per row: the cheapest rows


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """What tiny_cpu_sft builds for itself (tokenizer, generated conversations packed by
    sft-prepare), plus a converted random model so every layout starts from one set of
    weights (a random init would differ with the TP-padded vocabulary)."""
    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.convert.commands import hf_to_mcore
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.sft.recipes import tiny_cpu_sft
    from qmath_megatron.sft.task import prepare_synthetic_sft

    root = tmp_path_factory.mktemp("sft-data")
    job = prepare_synthetic_sft(
        apply_overrides(
            tiny_cpu_sft(), ["data.synthetic_conversations=32", f"model.seq_length={SEQ}"]
        ),
        root,
    )
    hf = make_random_hf_model(get_flavor("tiny-qwen-vocab"), root / "hf", seed=3)
    hf_to_mcore(hf, root / "mcore", tp=1)
    return {
        "overrides": [
            f"data.prefix={job.data.prefix}",
            f"model.init_from={root / 'mcore'}",
            f"model.seq_length={SEQ}",
        ],
        "prefix": job.data.prefix,
    }


def _common(data, save) -> list[str]:
    return data["overrides"] + [
        f"checkpoint.save={save}",
        f"train.train_iters={ITERS}",
        "data.global_batch_size=4",
        "data.micro_batch_size=2",
        "checkpoint.save_interval=null",
        "checkpoint.keep_last=null",
        "optim.lr=1e-2",
        "optim.min_lr=1e-3",
    ]


@pytest.fixture(scope="module")
def reference(sft_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("sft-ref") / "run"
    evals = [
        f"data.valid_prefix={sft_data['prefix']}",
        "train.eval_interval=8",
        "train.eval_iters=2",
    ]
    history = launch(sft_worker, 1, _common(sft_data, save) + evals)[0]
    return {h["iteration"]: h for h in history}, save


def _rows(save) -> dict[int, dict]:
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows if "loss" in r}


def _torchrun(overrides: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "qmath_megatron",
        "train",
        "sft",
        "--recipe",
        "tiny_cpu_sft",
        "parallel.tp=2",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: same sums
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def test_loss_falls_and_the_export_loads_in_transformers(reference, sft_data, tmp_path):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from qmath_megatron.convert.commands import mcore_to_hf
    from qmath_megatron.sft.dataset import PackedSFTDataset

    rows, save = reference
    assert sorted(rows) == list(range(1, ITERS + 1))
    first, last = rows[1]["loss"], np.mean([rows[i]["loss"] for i in range(ITERS - 3, ITERS + 1)])
    assert all(math.isfinite(r["loss"]) for r in rows.values())
    assert last < first - 3.0, (first, last)
    # Token-level loss: every step counts its assistant tokens (not a fixed sample count).
    assert len({r["loss_tokens"] for r in rows.values()}) > 1
    lines = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    val = {r["iteration"]: r["val_loss"] for r in lines if "val_loss" in r}
    assert sorted(val) == [8, 16] and val[16] < val[8] < first, val  # held-out eval ran

    out = tmp_path / "hf"
    mcore_to_hf(save, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    item = PackedSFTDataset(sft_data["prefix"])[0]
    n = int(item.sample_lengths[0])
    tokens = torch.as_tensor(item.tokens[:n]).unsqueeze(0)
    mask = torch.as_tensor(item.loss_mask[1:n]).bool()
    with torch.no_grad():
        logits = model(tokens).logits[0, :-1]
    nll = (
        torch.nn.functional.cross_entropy(logits, tokens[0, 1:], reduction="none")[mask]
        .mean()
        .item()
    )
    assert nll < first - 3.0, (nll, first)  # the trained weights, not the initial ones


def test_data_parallel_matches_single_rank(reference, sft_data, tmp_path):
    rows, _ = reference
    dp = launch(sft_worker, 2, _common(sft_data, tmp_path / "dp2") + ["train.exit_after_iters=2"])[
        0
    ]
    assert [h["iteration"] for h in dp] == [1, 2]
    for h in dp:
        ref = rows[h["iteration"]]
        assert h["loss_tokens"] == ref["loss_tokens"]
        assert _close(h["loss"], ref["loss"]) and _close(h["grad_norm"], ref["grad_norm"]), (h, ref)


def test_tp2_matches_tp1_and_a_sigterm_preempted_run_resumes_exactly(reference, sft_data, tmp_path):
    rows, _ = reference
    stop_at = 5
    # The uninterrupted TP=2 run, and at the same time the one that SIGTERM interrupts
    # (torchrun forwards the signal to its workers, as Slurm signals the job step).
    full, run = tmp_path / "full", tmp_path / "preempted"
    uninterrupted_proc = _torchrun(_common(sft_data, full) + [f"train.exit_after_iters={stop_at}"])
    proc = _torchrun(_common(sft_data, run))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    logged = _rows(run)
    saved = int((run / "latest_checkpointed_iteration.txt").read_text())
    # Checkpoint at the iteration in progress when the signal came; exit 0 (rank 0 says so).
    assert saved == max(logged) < stop_at, (saved, sorted(logged), err[-3000:])
    assert f"saved iteration {saved}, exiting" in out, out[-2000:]

    _, err = uninterrupted_proc.communicate(timeout=600)
    assert uninterrupted_proc.returncode == 0, err[-3000:]
    uninterrupted = _rows(full)
    assert sorted(uninterrupted) == list(range(1, stop_at + 1))
    for it in (1, 2):  # TP=2 equals TP=1: same loss and gradient norm, also after a step
        a, b = uninterrupted[it], rows[it]
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"]), (it, a, b)

    # The rerun resumes there and reproduces the uninterrupted losses exactly.
    proc = _torchrun(_common(sft_data, run) + [f"train.exit_after_iters={stop_at}"])
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert f"resumed from {run / f'iter_{saved:07d}'} at iteration {saved}" in out
    resumed = _rows(run)
    assert sorted(resumed) == list(range(1, stop_at + 1))
    for it in range(1, stop_at + 1):
        assert resumed[it]["loss"] == uninterrupted[it]["loss"], (
            it,
            resumed[it],
            uninterrupted[it],
        )
        assert resumed[it]["grad_norm"] == uninterrupted[it]["grad_norm"], it

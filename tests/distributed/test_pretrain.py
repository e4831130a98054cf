"""`qmath train pretrain` on CPU: TP=2 / PP=2 training, TP equivalence, exact resume,
crash-safe checkpoints, export to Hugging Face."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from qmath_megatron.parallel.runtime import WorkerError, free_port, launch
from tests.distributed.workers import pretrain_worker

pytestmark = pytest.mark.distributed
ITERS = 30


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Tokenizer + tokenized generated corpus, built once (what tiny_cpu builds itself)."""
    from qmath_megatron.pretrain.config import DataConfig
    from qmath_megatron.pretrain.data import prepare_synthetic_data

    root = tmp_path_factory.mktemp("pretrain-data")
    cfg = prepare_synthetic_data(DataConfig(synthetic_documents=300), root)
    return [
        f"data.blend={json.dumps(cfg.blend)}",
        f"data.tokenizer={cfg.tokenizer}",
        f"data.cache_dir={cfg.cache_dir}",
    ]


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """Continued pretraining starts from a converted HF model: every run here starts from
    the same weights whatever its TP/PP (random init differs with the padded vocab)."""
    from qmath_megatron.convert.commands import hf_to_mcore
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model

    root = tmp_path_factory.mktemp("init")
    hf = make_random_hf_model(get_flavor("tiny-qwen-vocab"), root / "hf", seed=3)
    hf_to_mcore(hf, root / "mcore", tp=1)
    return root / "mcore"


@pytest.fixture(scope="module")
def data(prepared, init_ckpt):
    return prepared + [f"model.init_from={init_ckpt}"]


def _common(data, save) -> list[str]:
    return data + [
        f"checkpoint.save={save}",
        f"train.train_iters={ITERS}",
        "model.seq_length=64",
        "data.global_batch_size=4",
        "data.micro_batch_size=2",
        "checkpoint.save_interval=10",
        "checkpoint.keep_last=null",
        "train.eval_interval=null",
    ]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted TP=1 run: (losses by iteration, checkpoint dir)."""
    save = tmp_path_factory.mktemp("ref") / "run"
    history = launch(pretrain_worker, 1, _common(data, save))[0]
    return {h["iteration"]: h["loss"] for h in history}, save


def _losses_from_jsonl(path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in rows if "loss" in r}


def test_loss_decreases(reference):
    losses, _ = reference
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses.values())
    assert sum(losses[i] for i in range(26, 31)) / 5 < losses[1] - 1.5, losses


def test_tp2_under_torchrun_matches_tp1_step_for_step(reference, data, tmp_path):
    losses, _ = reference
    save = tmp_path / "tp2"
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
        "pretrain",
        "--recipe",
        "tiny_cpu",
        "parallel.tp=2",
        *_common(data, save),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tp2 = _losses_from_jsonl(save / "metrics.jsonl")
    assert sorted(tp2) == list(range(1, ITERS + 1))
    assert math.isclose(tp2[1], losses[1], rel_tol=1e-6)
    for it in range(1, ITERS + 1):  # Adam amplifies float reordering slowly; stays close
        assert math.isclose(tp2[it], losses[it], rel_tol=2e-3), (it, tp2[it], losses[it])


def test_pp2_matches_tp1(reference, data, tmp_path):
    losses, _ = reference
    history = launch(pretrain_worker, 2, _common(data, tmp_path / "pp2") + ["parallel.pp=2"])[-1]
    pp2 = {h["iteration"]: h["loss"] for h in history}
    assert math.isclose(pp2[1], losses[1], rel_tol=1e-6)
    assert all(math.isclose(pp2[i], losses[i], rel_tol=2e-3) for i in range(1, ITERS + 1))


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_reproduces_the_uninterrupted_losses(reference, data, tmp_path, async_save):
    losses, _ = reference
    save = tmp_path / "resume"
    extra = ["train.exit_after_iters=15", f"checkpoint.async_save={str(async_save).lower()}"]
    first = launch(pretrain_worker, 1, _common(data, save) + extra)[0]
    assert [h["iteration"] for h in first][-1] == 15
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "15"
    second = launch(pretrain_worker, 1, _common(data, save))[0]
    resumed = {h["iteration"]: h["loss"] for h in second}
    assert sorted(resumed) == list(range(16, ITERS + 1))
    for it in resumed:  # same layout, same data position, same RNG: the same numbers
        assert math.isclose(resumed[it], losses[it], rel_tol=1e-9, abs_tol=1e-9), (
            it,
            resumed[it],
            losses[it],
        )


def test_crash_during_save_keeps_previous_checkpoint(reference, data, tmp_path, monkeypatch):
    losses, _ = reference
    save = tmp_path / "crash"
    # Saves every 5 iterations (not 10): the crash hits the second save after 10 steps, not 20.
    every5 = ["checkpoint.save_interval=5"]
    monkeypatch.setenv("QMATH_TEST_CRASH_DURING_SAVE", "10")
    with pytest.raises(WorkerError, match="exit code 13"):
        launch(pretrain_worker, 1, _common(data, save) + every5)
    monkeypatch.delenv("QMATH_TEST_CRASH_DURING_SAVE")
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    assert (save / "iter_0000010.tmp").is_dir() and not (save / "iter_0000010").exists()
    again = launch(pretrain_worker, 1, _common(data, save) + every5 + ["train.exit_after_iters=7"])
    assert [h["iteration"] for h in again[0]] == [6, 7]
    assert math.isclose(again[0][0]["loss"], losses[6], rel_tol=1e-9)
    assert not (save / "iter_0000010.tmp").exists()  # cleaned up at start
    # The crashed run logged 6..10 after its last checkpoint; the resumed run recomputed
    # them, so each iteration's training record is in metrics.jsonl once, in order.
    rows = [json.loads(x) for x in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == list(range(1, 8))


def test_final_checkpoint_exports_to_hf_with_matching_logits(reference, tmp_path):
    from qmath_megatron.convert.commands import mcore_to_hf, verify

    _, save = reference
    out = tmp_path / "hf"
    mcore_to_hf(save, out)
    result = verify(out, save, seq=32)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0


def test_diverging_run_stops_with_a_clear_message(data, tmp_path):
    """NaN/inf losses are skipped and counted; too many in a row stop the run."""
    overrides = _common(data, tmp_path / "nan") + [
        "optim.lr=1e9",
        "optim.min_lr=1e8",
        "optim.clip_grad=0",
        "train.max_consecutive_nonfinite=2",
    ]
    with pytest.raises(WorkerError, match="consecutive step\\(s\\) with non-finite loss"):
        launch(pretrain_worker, 1, overrides)
    rows = [
        json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
    ]
    last = rows[-1]
    assert last["skipped"] == 2 and not (
        math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    )
    # A skipped step leaves the weights and the LR schedule where they were.
    assert rows[-1]["lr"] == rows[-2]["lr"] == rows[-3]["lr"]


@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_activation_recompute_gives_the_same_steps(reference, data, tmp_path, recompute):
    losses, _ = reference
    overrides = _common(data, tmp_path / recompute) + [
        f"model.recompute={recompute}",
        "train.exit_after_iters=3",
    ]
    history = launch(pretrain_worker, 1, overrides)[0]
    for h in history:
        assert math.isclose(h["loss"], losses[h["iteration"]], rel_tol=1e-6), (
            h,
            losses[h["iteration"]],
        )

"""Pure pieces of the shared training loop: resume-settings check, config validation,
exit signals, the checkpoint helper process's lifetime, SFT recipes and sample order,
dataset validation at start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from qmath_megatron.config.overrides import apply_overrides, to_dict
from qmath_megatron.pretrain.config import PretrainJob
from qmath_megatron.pretrain.recipes import get_recipe
from qmath_megatron.sft.recipes import RECIPES as SFT_RECIPES
from qmath_megatron.training.resume import JOB_FILE, changed_settings, check_resume


def _job_dir(tmp_path, job):
    (tmp_path / JOB_FILE).write_text(json.dumps(to_dict(job)))
    return tmp_path


def test_resume_refuses_changed_run_settings_and_lists_them(tmp_path):
    saved = get_recipe("tiny_cpu")
    changed = apply_overrides(
        saved,
        [
            "optim.lr=1e-3",
            "model.seq_length=64",
            "train.seed=7",
            "data.global_batch_size=16",
            "logging.log_interval=5",
        ],
    )
    with pytest.raises(ValueError) as err:
        check_resume(_job_dir(tmp_path, saved), changed, allow_changed=False)
    message = str(err.value)
    for line in (
        "optim.lr: 0.003 -> 0.001",
        "model.seq_length: 128 -> 64",
        "train.seed: 1234 -> 7",
        "data.global_batch_size: 8 -> 16",
        "checkpoint.allow_changed_settings=true",
    ):
        assert line in message, message
    assert "log_interval" not in message  # safe: applied with a warning
    # The explicit override resumes, and tells the scheduler to take the new values.
    assert check_resume(tmp_path, changed, allow_changed=True) is True


def test_resume_applies_safe_changes_with_a_warning(tmp_path, caplog):
    saved = get_recipe("tiny_cpu")
    safe = apply_overrides(
        saved,
        [
            "parallel.tp=2",
            "data.micro_batch_size=4",
            "train.exit_after_iters=5",
            "checkpoint.save_interval=3",
            "model.recompute=full",
        ],
    )
    assert check_resume(_job_dir(tmp_path, saved), safe, allow_changed=False) is False
    assert "parallel.tp: 1 -> 2" in caplog.text and "model.recompute" in caplog.text
    refused, ok = changed_settings(to_dict(saved), saved)
    assert refused == ok == []


def test_grpo_engine_layout_is_a_safe_change_but_the_algorithm_is_not():
    from qmath_megatron.rl.recipes import tiny_cpu_grpo

    saved = to_dict(tiny_cpu_grpo())
    moved = apply_overrides(
        tiny_cpu_grpo(), ["rl.engines=2", "rl.placement=colocated", "rl.bucket_mb=8"]
    )
    refused, applied = changed_settings(saved, moved)
    assert refused == [] and len(applied) == 3, applied
    external = apply_overrides(tiny_cpu_grpo(), ["rl.engine_handles=/x/engines"])
    assert changed_settings(saved, external)[0] == []
    algo = apply_overrides(tiny_cpu_grpo(), ["rl.clip_high=0.28", "rl.group_size=4"])
    refused, _ = changed_settings(saved, algo)
    assert len(refused) == 2 and any("rl.clip_high" in r for r in refused), refused


def test_new_config_field_left_unset_does_not_block_old_checkpoints():
    saved = to_dict(PretrainJob())
    del saved["train"]["exit_duration_minutes"]
    assert changed_settings(saved, PretrainJob()) == ([], [])


@pytest.mark.parametrize(
    "override,message",
    [
        ("checkpoint.save_interval=-1", "checkpoint.save_interval must be >= 1"),
        ("checkpoint.save_interval=0", "checkpoint.save_interval must be >= 1"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 1"),
        ("logging.log_interval=0", "logging.log_interval must be >= 1"),
        ("train.eval_interval=0", "train.eval_interval must be >= 1"),
        ("train.train_iters=0", "train.train_iters must be >= 1"),
        ("train.exit_duration_minutes=0", "exit_duration_minutes must be > 0"),
        ("train.exit_signals=[SIGKILL]", "train.exit_signals"),
        ("scheduler.warmup_iters=-1", "scheduler.warmup_iters must be >= 0"),
        ("scheduler.wsd_decay_fraction=1.5", "wsd_decay_fraction"),
    ],
)
def test_config_rejects_invalid_values(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_recipe("tiny_cpu"), [override])


def test_exit_handler_flags_signals_and_the_wall_clock():
    from qmath_megatron.training.signals import ExitSignalHandler

    with ExitSignalHandler(["SIGUSR1"]) as handler:
        assert handler.should_exit() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert handler.should_exit() == "exit signal (SIGUSR1)"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    with ExitSignalHandler([], duration_minutes=1e-6, start_time=time.time() - 1) as handler:
        assert handler.should_exit() == "train.exit_duration_minutes reached"


def test_ctrl_c_saves_like_sigterm_and_a_second_one_aborts():
    from qmath_megatron.training.signals import ExitSignalHandler

    signals = get_recipe("tiny_cpu").train.exit_signals
    assert "SIGINT" in signals and "SIGTERM" in signals
    before = signal.getsignal(signal.SIGINT)
    with ExitSignalHandler(signals) as handler:
        assert signal.getsignal(signal.SIGINT) == handler._handle
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
        time.sleep(0.05)
        assert handler.should_exit() == "exit signal (SIGINT)"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before  # restored


_CHILD = """
import os, signal, time
from qmath_megatron.training.checkpointing import bind_checkpoint_children
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
bind_checkpoint_children()
queue = fa._get_write_results_queue()  # megatron's accessor returns the bound queue
queue.put(1)
import psutil
children = [p.pid for p in psutil.Process().children()]
print(" ".join(map(str, children)), flush=True)
time.sleep(600)
"""


def test_checkpoint_helper_process_survives_sigterm_and_dies_with_the_trainer():
    """Item 8: megatron's multiprocessing manager (started at the first save) must not
    outlive a killed trainer; it must also survive the SIGTERM that torchrun and Slurm send
    to the whole process group, or the preemption checkpoint cannot be written."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in proc.stdout.readline().split()]
        assert children, "the manager process was not started"
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(psutil.pid_exists(pid) for pid in children)
        proc.kill()  # SIGKILL: no Python clean-up runs in the trainer
        proc.wait(timeout=10)
        deadline = time.time() + 10
        alive = children
        while alive and time.time() < deadline:
            alive = [
                p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
            ]
            time.sleep(0.1)
        assert not alive, f"orphaned children: {alive}"
    finally:
        proc.kill()


@pytest.mark.parametrize("name", sorted(SFT_RECIPES))
def test_sft_recipes_resolve_and_fit(name):
    from qmath_megatron.sft.task import SFTTask
    from qmath_megatron.training.dry_run import dry_run

    job = SFT_RECIPES[name]()
    plan = dry_run(
        job, world=job.parallel.model_parallel_size * 2, iterations=SFTTask.planned_iters(job)
    )
    if name == "tiny_cpu_sft":
        assert plan["iterations"] == 30
        return
    assert plan["iterations"] is None  # 2 epochs of a dataset that is not there
    assert (job.optim.lr, job.optim.min_lr, job.optim.weight_decay, job.optim.clip_grad) == (
        7e-6,
        7e-7,
        0.1,
        1.0,
    )
    assert (
        job.train.epochs == 2
        and job.model.seq_length == 4096
        and job.scheduler.decay_style == "cosine"
    )
    assert job.model.init_from and "cpt" in job.model.init_from
    assert plan["memory_gb_per_gpu"]["first_stage"]["total"] < 80, plan["memory_gb_per_gpu"]
    if name == "qwen25_math_72b_sft":
        assert (job.parallel.tp, job.parallel.pp) == (8, 4)


def test_sft_iterations_from_epochs_and_dataset_size(tmp_path):
    from qmath_megatron.sft.task import SFTTask

    job = apply_overrides(SFT_RECIPES["qwen25_math_7b_sft"](), [f"data.prefix={tmp_path / 'd'}"])
    (tmp_path / "d.report.json").write_text(json.dumps({"sequences": 1000}))
    assert SFTTask.planned_iters(job) == 16  # ceil(2 * 1000 / 128)
    assert SFTTask.planned_iters(apply_overrides(job, ["train.train_iters=5"])) == 5


def test_sft_sample_order_is_a_fresh_permutation_every_epoch():
    from qmath_megatron.sft.task import SFTTask

    task = SFTTask(SFT_RECIPES["tiny_cpu_sft"]())
    task.train_set, task._perm = list(range(10)), None
    first = [task._sample(i) for i in range(10)]
    second = [task._sample(i) for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    task._perm = None  # a resumed process rebuilds the same order from the position alone
    assert [task._sample(i) for i in range(12, 15)] == second[2:5]


def test_truncated_bin_fails_at_start_up_naming_the_file(tmp_path):
    from qmath_megatron.data.indexed import write_index
    from qmath_megatron.pretrain.data import check_prefixes

    prefix = tmp_path / "ds"
    write_index(f"{prefix}.idx", np.int32, np.array([5, 7]), np.array([0, 2]))
    (tmp_path / "ds.bin").write_bytes(np.arange(12, dtype=np.int32).tobytes())
    check_prefixes([str(prefix)])
    (tmp_path / "ds.bin").write_bytes(np.arange(9, dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match="ds.bin"):
        check_prefixes([str(prefix)])


def test_train_cli_lists_stages_and_sft_dry_run(capsys):
    from qmath_megatron.cli import main

    assert (
        main(["train", "sft", "--recipe", "qwen25_math_72b_sft", "--dry-run", "--world-size", "64"])
        == 0
    )
    out = capsys.readouterr().out
    assert "world size 64" in out and "iterations depend on the dataset" in out
    assert main(["train", "sft", "--recipe", "nope", "--dry-run"]) == 1
    assert "unknown sft recipe 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script,stage",
    [
        ("pretrain.sbatch", "pretrain"),
        ("pretrain_single_node.sbatch", "pretrain"),
        ("sft.sbatch", "sft"),
    ],
)
def test_sbatch_time_limit_signal_saves_then_requeues(tmp_path, script, stage):
    """SIGUSR1 to the batch script (Slurm's --signal=B:USR1@300): SIGTERM goes to the
    training step (srun -> torchrun -> ranks, which save and exit), then the job requeues."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bin_dir, log = tmp_path / "bin", tmp_path / "events.txt"
    bin_dir.mkdir()
    stubs = {
        "srun": f'echo "srun $*" >> {log}; trap \'echo "srun got TERM" >> {log}; exit 0\' TERM; '
        "for i in $(seq 300); do sleep 0.1; done",
        "scontrol": f'if [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> {log}; fi',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECIPE": "r",
        "SLURM_JOB_NODELIST": "node1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_ID": "77",
        "LOG_DIR": str(tmp_path / "logs"),
    }
    proc = subprocess.Popen(["bash", str(root / "slurm" / script), "a.b=1"], env=env, cwd=tmp_path)
    deadline = time.time() + 20
    while not (log.is_file() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0
    events = log.read_text().splitlines()
    assert f"-m qmath_megatron train {stage} --recipe r a.b=1" in events[0]
    assert events[1:] == ["srun got TERM", "scontrol requeue 77"]


def test_default_evaluate_is_the_loss_over_validation_microbatches():
    """Task.evaluate (used by the pretrain and SFT tasks): no validation microbatches -> no
    metrics; else one forward-only pass over them, its `loss_key` mean as `val_loss`."""
    from qmath_megatron.training.task import Task

    calls = []

    class Ctx:
        def forward_only(self, mbs, forward_step, *, keys=None):
            calls.append((mbs, forward_step, keys))
            return {"lm loss": 2.5}

    class NoValid(Task):
        def microbatches(self, ctx, state):
            return []

    class Valid(NoValid):
        def validation_microbatches(self, ctx, state):
            return [{"tokens": state}]

    assert NoValid(PretrainJob()).evaluate(Ctx(), 3) == {} and not calls
    task = Valid(PretrainJob())
    assert task.evaluate(Ctx(), 3) == {"val_loss": 2.5}
    assert calls == [([{"tokens": 3}], task.forward_step, ["lm loss"])]

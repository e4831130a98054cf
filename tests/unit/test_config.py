from __future__ import annotations

import pytest

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig


def test_data_parallel_size_is_derived_and_checked():
    p = ParallelConfig(tp=2, pp=2)
    assert p.model_parallel_size == 4
    assert p.data_parallel_size(16) == 4
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        p.data_parallel_size(6)
    with pytest.raises(ValueError, match="gives dp=4"):
        ParallelConfig(tp=2, pp=2, dp=2).data_parallel_size(16)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"tp": 0}, "positive integer"),
        ({"pp": 1, "vpp": 2}, "needs pipeline parallelism"),
        ({"tp": 1, "sequence_parallel": True}, "requires parallel.tp > 1"),
    ],
)
def test_parallel_config_rejects_bad_layouts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)


def test_vpp_of_one_means_no_interleaving():
    assert ParallelConfig(pp=2, vpp=1).vpp is None


def test_precision_aliases_and_validation():
    assert PrecisionConfig(fp8="hybrid", fp8_recipe="current").fp8_recipe == "tensorwise"
    with pytest.raises(ValueError, match="needs precision.dtype=bf16"):
        PrecisionConfig(dtype="fp32", fp8="hybrid")
    with pytest.raises(ValueError, match="not supported with the delayed"):
        PrecisionConfig(fp8="hybrid", fp8_recipe="delayed", first_last_layers_bf16=True)
    with pytest.raises(ValueError, match="fp8_recipe must be one of"):
        PrecisionConfig(fp8="hybrid", fp8_recipe="fancy")
    with pytest.raises(ValueError, match="need precision.fp8"):
        PrecisionConfig(fp8_param=True)


def test_optim_config_validation():
    with pytest.raises(ValueError, match="min_lr"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="adam_beta"):
        OptimConfig(adam_beta2=1.0)


def test_recipe_registry_names_and_tiny_cpu_defaults():
    """config/recipes.py, shared by the pretrain, SFT, RM (and GRPO) recipe modules."""
    from qmath_megatron.config.job import TrainConfig
    from qmath_megatron.config.recipes import (
        TINY_CPU_FLAVOR,
        build_recipe,
        recipe_registry,
        tiny_cpu_job,
    )
    from qmath_megatron.pretrain.config import PretrainJob
    from qmath_megatron.reward_model.config import RMJob
    from qmath_megatron.reward_model.recipes import RECIPES as RM_RECIPES

    def a() -> PretrainJob:
        return tiny_cpu_job(PretrainJob, "a", 64, train=TrainConfig(train_iters=3))

    table = recipe_registry(a, ("a_long", lambda: tiny_cpu_job(PretrainJob, "a", 512)))
    assert list(table) == ["a", "a_long"]
    job = build_recipe(table, "a")
    assert (job.name, job.model.flavor, job.model.seq_length) == ("a", TINY_CPU_FLAVOR, 64)
    assert (job.precision.dtype, job.parallel.tp, job.parallel.pp, job.logging.log_interval) == (
        "fp32",
        1,
        1,
        1,
    )
    ck = job.checkpoint
    assert (ck.save, ck.save_interval, ck.keep_last, job.train.train_iters) == ("runs/a", 10, 2, 3)
    with pytest.raises(KeyError, match="unknown sft recipe 'b'; known: a, a_long"):
        build_recipe(table, "b", "sft recipe")
    with pytest.raises(ValueError, match="'a' registered twice"):
        recipe_registry(a, ("a", a))
    with pytest.raises(ValueError, match="needs a name"):
        recipe_registry(lambda: a())
    rm = RM_RECIPES["tiny_cpu_rm"]()  # its own checkpoint cadence
    assert isinstance(rm, RMJob) and (rm.checkpoint.save_interval, rm.checkpoint.keep_last) == (
        30,
        1,
    )


def test_resume_safety_is_field_metadata():
    """Which keys may change on resume is said by RESUME_SAFE metadata beside each field:
    whole sections (parallel, logging, checkpoint), single fields (micro batch, recompute,
    eval/exit cadence, the GRPO engine layout), and a job's name in every stage (a subclass
    that only gives `name` a new default keeps the base class's marking)."""
    from qmath_megatron.config.job import JobConfig
    from qmath_megatron.pretrain.config import PretrainJob
    from qmath_megatron.rl.recipes import tiny_cpu_grpo
    from qmath_megatron.training.resume import is_resume_safe, resume_safe_keys

    safe = resume_safe_keys(tiny_cpu_grpo())
    for key in (
        "name",
        "parallel.tp",
        "logging.log_interval",
        "checkpoint.save",
        "data.micro_batch_size",
        "model.recompute",
        "model.init_from",
        "train.exit_signals",
        "optim.overlap_grad_reduce",
        "precision.fp8_amax_history_len",
        "rl.engines",
        "rl.engine_handles_timeout_s",
        "rl.weight_transfer",
        "rl.rm_batch_size",
    ):
        assert is_resume_safe(key, safe), key
    for key in (
        "optim.lr",
        "data.global_batch_size",
        "model.seq_length",
        "train.seed",
        "train.train_iters",
        "precision.dtype",
        "rl.group_size",
        "rl.clip_high",
        "rl.kl_coef",
    ):
        assert not is_resume_safe(key, safe), key
    assert "data.cache_dir" in resume_safe_keys(PretrainJob())
    assert "name" in resume_safe_keys(PretrainJob()) and "name" in resume_safe_keys(JobConfig())

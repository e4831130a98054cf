"""Pure pieces of the trainer: FLOPs, dry-run arithmetic, recipes, data partitioning."""

from __future__ import annotations

import pytest
import torch

from qmath_megatron.config.overrides import apply_overrides
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.pretrain.data import global_batch_microbatches, parse_blend
from qmath_megatron.pretrain.recipes import RECIPES, get_recipe
from qmath_megatron.training.dry_run import dry_run, layer_params_per_tp_rank
from qmath_megatron.training.metrics import train_flops_per_token


def test_flops_per_token_hand_computed():
    # tiny-untied: L=4, h=96, f=256, n=6, g=2, d=16, V=1000, s=10.
    f = get_flavor("tiny-untied")
    per_layer = 2 * 96 * (96 + 2 * 32) + 2 * 10 * 96 + 2 * 96 * 96 + 6 * 96 * 256
    assert train_flops_per_token(f, 10) == 3 * (4 * per_layer + 2 * 96 * 1000)


def test_flops_close_to_6n_for_a_7b_model():
    """Sanity: at short context, training FLOPs/token ~ 6 x (non-embedding + head) params."""
    f = get_flavor("qwen2.5-7b")
    flops = train_flops_per_token(f, 1)
    params = 28 * (layer_params_per_tp_rank(f, 1) - 2 * 3584) + 3584 * 152064
    assert abs(flops / (6 * params) - 1) < 0.01


def test_layer_params_sum_to_the_model():
    f = get_flavor("qwen2.5-72b")
    from qmath_megatron.models.flavors import count_parameters

    body = f.num_layers * layer_params_per_tp_rank(f, 1)
    assert body + f.hidden_size + 2 * f.vocab_size * f.hidden_size == count_parameters(f)


def test_dry_run_72b_layout_and_budget():
    plan = dry_run(get_recipe("qwen25_math_72b_cpt"), world=1024)
    assert plan["data_parallel_size"] == 1024 // (8 * 4)
    assert plan["params_total"] == "72.71B"
    layers = sorted(layer for st in plan["layout"] for layer in range(*st["layers"]))
    assert layers == list(range(80)) and len(plan["layout"]) == 4 * 5
    assert plan["layout"][0]["ranks"] == (0, 255)  # pipeline rank 0 = first 8*32 ranks
    assert plan["iterations"] == -(-(10**12) // (1024 * 4096))
    mem = plan["memory_gb_per_gpu"]["first_stage"]
    assert 0 < mem["total"] < 80, mem  # fits an 80 GB H100 by the estimate


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves_and_fits(name):
    job = get_recipe(name)
    world = job.parallel.model_parallel_size * (1 if name == "tiny_cpu" else 8)
    plan = dry_run(job, world=world)
    assert plan["iterations"] > 0
    if name != "tiny_cpu":
        assert job.model.seq_length >= 4096 and job.precision.dtype == "bf16"
        assert plan["memory_gb_per_gpu"]["first_stage"]["total"] < 80, (
            name,
            plan["memory_gb_per_gpu"],
        )
    if name.endswith("_fp8"):
        assert job.precision.fp8 == "hybrid"


def test_long_context_recipe_raises_rope_base_and_length():
    job = get_recipe("qwen25_math_7b_long_context")
    assert job.model.seq_length == 32768 and job.model.rope_theta == 1e6
    assert get_flavor(job.model.flavor).rope_theta == 1e4  # from the 4K CPT model
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        dry_run(apply_overrides(job, ["model.max_position_embeddings=null"]), world=64)


def test_dry_run_rejects_bad_batch_layout():
    job = apply_overrides(
        get_recipe("tiny_cpu"), ["data.global_batch_size=6", "data.micro_batch_size=2"]
    )
    with pytest.raises(ValueError, match="not divisible by micro batch"):
        dry_run(job, world=2)


def test_parse_blend():
    assert parse_blend(["a"]) == (["a"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="pairs"):
        parse_blend(["0.3", "a", "0.7"])
    with pytest.raises(ValueError, match="empty"):
        parse_blend([])


def test_global_batches_partition_the_sample_stream():
    dataset = [
        {
            "tokens": torch.full((4,), i),
            "labels": torch.full((4,), i),
            "loss_mask": torch.ones(4),
            "position_ids": torch.arange(4),
        }
        for i in range(10)
    ]
    seen = []
    for dp_rank in range(2):
        mbs = global_batch_microbatches(
            dataset, consumed_samples=8, global_batch=4, micro_batch=1, dp_rank=dp_rank, dp_size=2
        )
        assert len(mbs) == 2
        seen += [int(mb["tokens"][0, 0]) for mb in mbs]
    assert seen == [8, 9, 0, 1]  # the next 4 samples, wrapping at the epoch end, split by rank
    with pytest.raises(ValueError, match="not divisible"):
        global_batch_microbatches(dataset, 0, 4, 3, 0, 1)


def test_metrics_sink_writes_jsonl_and_tensorboard(tmp_path, capsys):
    import json

    from qmath_megatron.training.metrics import MetricsSink

    sink = MetricsSink(str(tmp_path / "m.jsonl"), str(tmp_path / "tb"), None, "offline", "run", {})
    sink.log(1, {"loss": 2.5, "lr": 1e-4, "mfu": float("nan")})
    sink.log(2, {"loss": 2.25, "lr": 1e-4, "mfu": float("nan")})
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[1]["loss"] == 2.25
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "iter      2 | loss 2.25" in capsys.readouterr().out


def test_wandb_requested_without_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    from qmath_megatron.training.metrics import MetricsSink

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match="wandb is not installed"):
        MetricsSink(None, None, "proj", "offline", "run", {})

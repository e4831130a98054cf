"""TransformerConfig / layer spec construction, checked without a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.models.builder import (
    build_layer_spec,
    build_transformer_config,
    check_parallel_fits,
    padded_vocab_size,
)
from qmath_megatron.models.flavors import get_flavor


@pytest.mark.parametrize(
    "vocab,tp,expected",
    [
        (151936, 1, 151936),
        (151936, 2, 152064),
        (152064, 8, 152576),
        (151665, 1, 151680),
        (1000, 2, 1024),
    ],
)
def test_vocab_padding_as_megatron(vocab, tp, expected):
    padded = padded_vocab_size(vocab, tp)
    assert padded == expected and padded % (128 * tp) == 0 and padded >= vocab


def test_qwen_architecture_fields():
    flavor = get_flavor("qwen2.5-math-7b")
    cfg = build_transformer_config(
        flavor, ParallelConfig(tp=4, pp=2), PrecisionConfig(dtype="bf16")
    )
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (28, 3584, 18944)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels) == (28, 4, 128)
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-6
    assert cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.add_qkv_bias and not cfg.add_bias_linear
    assert cfg.tensor_model_parallel_size == 4 and cfg.pipeline_model_parallel_size == 2
    assert cfg.bf16 and cfg.params_dtype == torch.bfloat16 and cfg.fp8 is None


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_settings_reach_transformer_config(recipe):
    bf16_ends = recipe != "delayed"
    precision = PrecisionConfig(
        dtype="bf16",
        fp8="hybrid",
        fp8_recipe=recipe,
        fp8_amax_history_len=512,
        fp8_amax_compute_algo="most_recent",
        fp8_margin=1,
        fp8_wgrad=False,
        first_last_layers_bf16=bf16_ends,
        num_layers_at_start_in_bf16=2 if bf16_ends else 1,
        num_layers_at_end_in_bf16=1,
    )
    cfg = build_transformer_config(get_flavor("qwen2.5-1.5b"), ParallelConfig(tp=2), precision)
    assert cfg.fp8 == "hybrid" and cfg.fp8_recipe == recipe
    assert cfg.fp8_amax_history_len == 512 and cfg.fp8_amax_compute_algo == "most_recent"
    assert cfg.fp8_margin == 1 and cfg.fp8_wgrad is False
    assert cfg.first_last_layers_bf16 is bf16_ends
    if bf16_ends:
        assert (cfg.num_layers_at_start_in_bf16, cfg.num_layers_at_end_in_bf16) == (2, 1)


def test_current_scaling_alias_reaches_megatron_as_tensorwise():
    precision = PrecisionConfig(fp8="e4m3", fp8_recipe="current")
    cfg = build_transformer_config(get_flavor("tiny-untied"), ParallelConfig(), precision)
    assert (cfg.fp8, cfg.fp8_recipe) == ("e4m3", "tensorwise")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_model_without_transformer_engine_is_refused():
    from qmath_megatron.models.builder import build_model

    cfg = build_transformer_config(
        get_flavor("tiny-untied"),
        ParallelConfig(),
        PrecisionConfig(fp8="hybrid", fp8_recipe="tensorwise"),
    )
    with pytest.raises(RuntimeError, match="Transformer Engine"):
        build_model(get_flavor("tiny-untied"), cfg)


@pytest.mark.parametrize(
    "flavor,parallel,message",
    [
        ("tiny-untied", ParallelConfig(tp=4), "does not divide the 6 attention heads"),
        ("qwen2.5-7b", ParallelConfig(tp=7), "does not divide the 4 KV groups"),
        ("tiny-untied", ParallelConfig(pp=3), "cannot be split evenly"),
        ("tiny-untied", ParallelConfig(pp=2, vpp=4), "PP=2 x VPP=4"),
    ],
)
def test_layouts_that_do_not_fit_are_named(flavor, parallel, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_fits(get_flavor(flavor), parallel)


def test_local_layer_spec_on_cpu_uses_rmsnorm_modules():
    spec = build_layer_spec(use_te=False)
    # The local spec's norm is a module that builds torch RMSNorm for normalization="RMSNorm".
    assert "input_layernorm" in spec.submodules.__dict__
    assert spec.submodules.self_attention.submodules.linear_qkv.__name__ == "ColumnParallelLinear"


@pytest.mark.parametrize(
    "flavor,tp", [("qwen2.5-math-1.5b", 4), ("qwen2.5-1.5b", 4), ("qwen2.5-3b", 8), ("tiny-kv1", 4)]
)
def test_fewer_kv_groups_than_tp_fit(flavor, tp):
    """Megatron-Core 0.16.1 runs TP a multiple of the KV groups."""
    check_parallel_fits(get_flavor(flavor), ParallelConfig(tp=tp))
    build_transformer_config(get_flavor(flavor), ParallelConfig(tp=tp), PrecisionConfig())

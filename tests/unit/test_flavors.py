from __future__ import annotations

import pytest

from qmath_megatron.convert.hf_io import ConversionError, flavor_from_hf_config
from qmath_megatron.models.flavors import (
    CARD_DISCREPANCIES,
    FLAVORS,
    QwenFlavor,
    count_parameters,
    format_billions,
    get_flavor,
    matches_published,
)
from qmath_megatron.models.hf_config import hf_config_from_flavor

PUBLISHED = [f for f in FLAVORS.values() if f.published_params]


def test_all_published_flavors_present():
    expected = {f"qwen2.5-{s}" for s in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b")}
    expected |= {f"qwen2.5-math-{s}" for s in ("1.5b", "7b", "72b")}
    assert expected <= set(FLAVORS)


@pytest.mark.parametrize("flavor", PUBLISHED, ids=lambda f: f.name)
def test_parameter_count_matches_model_card(flavor):
    matches = matches_published(count_parameters(flavor), flavor.published_params)
    # Only documented card errors may disagree, and they must really disagree.
    assert matches is (flavor.name not in CARD_DISCREPANCIES)


def test_qwen25_32b_card_discrepancy_is_the_config_count():
    assert count_parameters(get_flavor("qwen2.5-32b")) == 32_763_876_352
    assert set(CARD_DISCREPANCIES) == {"qwen2.5-32b"}


def test_exact_counts_hand_computed():
    # Qwen2.5-7B from its config: 28 layers, hidden 3584, ffn 18944, 28 heads, 4 KV groups.
    h, f, kv, v = 3584, 18944, 4 * 128, 152064
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    assert count_parameters(get_flavor("qwen2.5-7b")) == 28 * layer + h + 2 * v * h
    assert count_parameters(get_flavor("qwen2.5-7b")) == 7_615_616_512
    # Tied embeddings are counted once.
    tied = get_flavor("qwen2.5-1.5b")
    assert count_parameters(tied) == count_parameters(tied.replace(tie_word_embeddings=False)) - (
        151936 * 1536
    )


def test_matches_published_uses_card_precision():
    assert matches_published(7_615_616_512, "7.61B")  # cards truncate
    assert matches_published(494_032_768, "0.49B")
    assert not matches_published(7_700_000_000, "7.61B")
    assert format_billions(72_706_203_648) == "72.71B"


def test_math_flavors_use_rope_base_10k_and_4k_context():
    for size in ("1.5b", "7b", "72b"):
        f = get_flavor(f"qwen2.5-math-{size}")
        assert f.rope_theta == 10000.0 and f.max_position_embeddings == 4096


def test_get_flavor_is_forgiving_about_spelling_and_strict_about_names():
    assert get_flavor("Qwen2.5_Math_7B").name == "qwen2.5-math-7b"
    with pytest.raises(KeyError, match="known flavors"):
        get_flavor("qwen3-8b")


def test_tiny_qwen_vocab_with_a_head_dim_cpu_vllm_runs():
    # tiny-qwen-vocab's body with 2 heads of 32 (vLLM's CPU attention refuses its 16).
    old, new = get_flavor("tiny-qwen-vocab"), get_flavor("tiny-qwen-vocab-hd32")
    assert (old.head_dim, new.head_dim) == (16, 32)
    assert new == old.replace(name=new.name, num_attention_heads=2, num_query_groups=2)
    # Per layer, K and V each gain 2 groups x 16 rows of 64 weights and a bias.
    extra = 2 * 2 * (32 * 64 + 32)
    assert new.vocab_size == 151936 and count_parameters(new) == count_parameters(old) + extra


def test_flavor_validation():
    with pytest.raises(ValueError, match="not divisible by num_query_groups"):
        get_flavor("tiny-tied").replace(num_query_groups=3)


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen2.5-math-1.5b", "tiny-untied"])
def test_hf_config_round_trip(name):
    import torch

    flavor = get_flavor(name)
    assert flavor_from_hf_config(hf_config_from_flavor(flavor, torch.bfloat16)) == flavor


def test_transformers4_config_spelling_is_read():
    """Published Qwen2.5 config.json files (transformers 4.x) have a top-level rope_theta."""
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 4096,
    }
    assert flavor_from_hf_config(cfg).name == "qwen2.5-math-7b"
    cfg["rope_theta"] = 1e6
    cfg["max_position_embeddings"] = 131072
    assert flavor_from_hf_config(cfg).name == "qwen2.5-7b"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unknown architecture"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, message):
    import torch

    cfg = hf_config_from_flavor(get_flavor("tiny-tied"), torch.float32) | change
    with pytest.raises(ConversionError, match=message):
        flavor_from_hf_config(cfg)


def test_custom_architecture_gets_custom_name():
    import torch

    cfg = hf_config_from_flavor(get_flavor("tiny-tied").replace(num_layers=3), torch.float32)
    flavor = flavor_from_hf_config(cfg)
    assert flavor.name == "custom-qwen2" and flavor.num_layers == 3
    assert QwenFlavor.from_dict(flavor.to_dict()) == flavor

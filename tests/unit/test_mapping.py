"""The declarative HF <-> Megatron layouts, against hand-built expectations."""

from __future__ import annotations

import torch

from qmath_megatron.convert import mapping
from qmath_megatron.convert.mapping import Layout
from qmath_megatron.models.flavors import get_flavor

# 4 heads in 2 KV groups, head_dim 2, hidden 8.
FLAVOR = get_flavor("tiny-tied").replace(
    hidden_size=8, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=6, vocab_size=5
)
QKV = next(r for r in mapping.RULES if r.mcore.endswith("linear_qkv.weight"))
QKV_BIAS = next(r for r in mapping.RULES if r.mcore.endswith("linear_qkv.bias"))
FC1 = next(r for r in mapping.RULES if r.mcore.endswith("linear_fc1.weight"))
EMB = mapping.RULES[0]


def _rows(start: int, n: int, width: int = 8) -> torch.Tensor:
    """Row r holds the value start + r in every column: rows are easy to follow."""
    return (torch.arange(start, start + n, dtype=torch.float32)[:, None]).repeat(1, width)


def test_qkv_interleaves_per_query_group():
    q, k, v = _rows(0, 8), _rows(100, 4), _rows(200, 4)  # q: 4 heads x 2; k, v: 2 groups x 2
    fused = mapping.to_mcore_shard(QKV, [q, k, v], FLAVOR, padded_vocab=8, tp_rank=0, tp_size=1)
    # Group 0: q heads 0,1 (rows 0-3), k0 (100,101), v0 (200,201); then group 1.
    expected = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert fused[:, 0].tolist() == expected


def test_qkv_tp_shards_hold_whole_groups():
    q, k, v = _rows(0, 8), _rows(100, 4), _rows(200, 4)
    shard1 = mapping.to_mcore_shard(QKV, [q, k, v], FLAVOR, padded_vocab=8, tp_rank=1, tp_size=2)
    assert shard1[:, 0].tolist() == [4, 5, 6, 7, 102, 103, 202, 203]


def test_qkv_bias_uses_the_same_layout():
    qb, kb, vb = torch.arange(8.0), torch.arange(100.0, 104), torch.arange(200.0, 204)
    fused = mapping.to_mcore_shard(
        QKV_BIAS, [qb, kb, vb], FLAVOR, padded_vocab=8, tp_rank=0, tp_size=1
    )
    assert fused.tolist()[:8] == [0, 1, 2, 3, 100, 101, 200, 201]
    back = mapping.to_hf(QKV_BIAS, fused, FLAVOR)
    assert all(torch.equal(a, b) for a, b in zip(back, [qb, kb, vb]))


def test_swiglu_shards_are_gate_then_up_per_rank():
    gate, up = _rows(0, 6), _rows(100, 6)
    r0 = mapping.to_mcore_shard(FC1, [gate, up], FLAVOR, padded_vocab=8, tp_rank=0, tp_size=2)
    r1 = mapping.to_mcore_shard(FC1, [gate, up], FLAVOR, padded_vocab=8, tp_rank=1, tp_size=2)
    assert r0[:, 0].tolist() == [0, 1, 2, 100, 101, 102]
    assert r1[:, 0].tolist() == [3, 4, 5, 103, 104, 105]
    full = mapping.to_mcore_shard(FC1, [gate, up], FLAVOR, padded_vocab=8, tp_rank=0, tp_size=1)
    assert [torch.equal(a, b) for a, b in zip(mapping.to_hf(FC1, full, FLAVOR), [gate, up])] == [
        True,
        True,
    ]


def test_vocab_padding_is_zero_and_truncated_on_export():
    emb = _rows(1, 5)
    shard = mapping.to_mcore_shard(EMB, [emb], FLAVOR, padded_vocab=8, tp_rank=1, tp_size=2)
    assert shard[:, 0].tolist() == [5, 0, 0, 0]  # rows 4..7: the last real row, then padding
    full = mapping.to_mcore_shard(EMB, [emb], FLAVOR, padded_vocab=8, tp_rank=0, tp_size=1)
    assert torch.equal(mapping.to_hf(EMB, full, FLAVOR)[0], emb)


def test_row_parallel_splits_input_dim():
    o = torch.arange(64.0).reshape(8, 8)
    proj = next(r for r in mapping.RULES if r.layout is Layout.ROW)
    shard = mapping.to_mcore_shard(proj, [o], FLAVOR, padded_vocab=8, tp_rank=1, tp_size=2)
    assert torch.equal(shard, o[:, 4:])


def test_names_match_both_layer_specs():
    local = mapping.match_mcore("decoder.layers.3.input_layernorm.weight")
    te = mapping.match_mcore("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight")
    assert local == te and local[1] == 3
    te_mlp = mapping.match_mcore("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")
    assert te_mlp[0].hf == ("model.layers.{i}.post_attention_layernorm.weight",)
    assert mapping.match_mcore("decoder.layers.0.self_attention.core_attention.foo") is None


def test_tied_output_layer_reads_the_embedding():
    out = next(r for r in mapping.RULES if r.mcore == "output_layer.weight")
    assert mapping.hf_names(out, None, get_flavor("tiny-tied")) == ("model.embed_tokens.weight",)
    assert mapping.hf_names(out, None, get_flavor("tiny-untied")) == ("lm_head.weight",)


def test_hf_tensor_list_covers_every_tensor_once():
    flavor = get_flavor("tiny-untied")
    names = mapping.hf_tensor_names(flavor)
    assert len(names) == len(set(names)) == 3 + 12 * flavor.num_layers
    assert "lm_head.weight" in names
    assert "lm_head.weight" not in mapping.hf_tensor_names(get_flavor("tiny-tied"))


def test_qkv_shards_with_fewer_kv_groups_than_tp_split_the_fused_rows_evenly():
    """TP=4 with 2 KV groups: Megatron splits [q0 q1 k0 v0 | q2 q3 k1 v1] into 4 equal row
    blocks (rank 1 holds k0, v0 only); attention all-gathers the activations."""
    q, k, v = _rows(0, 8), _rows(100, 4), _rows(200, 4)
    shards = [
        mapping.to_mcore_shard(QKV, [q, k, v], FLAVOR, padded_vocab=8, tp_rank=r, tp_size=4)
        for r in range(4)
    ]
    assert [s[:, 0].tolist() for s in shards] == [
        [0, 1, 2, 3],
        [100, 101, 200, 201],
        [4, 5, 6, 7],
        [102, 103, 202, 203],
    ]


def test_from_shards_inverts_every_rule_at_every_tp():
    """to_mcore_shard on every rank -> from_mcore_shards -> to_hf gives the HF tensors back
    (TP 1, 2, 4; 4 TP > 2 KV groups), for every rule of the table."""
    flavor = FLAVOR.replace(ffn_hidden_size=8)
    gen = torch.Generator().manual_seed(0)
    shapes = {  # HF shapes of the rules' inputs (hidden 8, 4 heads x 2, 2 groups, ffn 8)
        "embedding": [(5, 8)],
        "input_layernorm": [(8,)],
        "linear_qkv.weight": [(8, 8), (4, 8), (4, 8)],
        "linear_qkv.bias": [(8,), (4,), (4,)],
        "linear_proj": [(8, 8)],
        "pre_mlp_layernorm": [(8,)],
        "linear_fc1": [(8, 8), (8, 8)],
        "linear_fc2": [(8, 8)],
        "final_layernorm": [(8,)],
        "output_layer": [(5, 8)],
    }
    for rule in mapping.RULES:
        (key,) = [k for k in shapes if k in rule.mcore]
        hf = [torch.randn(s, generator=gen) for s in shapes[key]]
        for tp in (1, 2, 4):
            shards = [
                mapping.to_mcore_shard(rule, hf, flavor, padded_vocab=8, tp_rank=r, tp_size=tp)
                for r in range(tp)
            ]
            full = mapping.from_mcore_shards(rule, shards)
            assert full.shape == mapping.full_shape(rule, shards[0].shape, tp), (rule.mcore, tp)
            back = mapping.to_hf(rule, full, flavor)
            assert len(back) == len(hf)
            for a, b in zip(back, hf, strict=True):
                assert torch.equal(a, b), (rule.mcore, tp)


def test_bucket_tensors_keeps_order_and_caps_bytes():
    """convert.export.bucket_tensors (iter_hf_buckets' grouping): at most bucket_bytes per
    bucket, a larger tensor alone, order kept, a non-positive cap refused."""
    import pytest

    from qmath_megatron.convert.export import bucket_tensors

    sizes = [4, 4, 12, 2, 2, 2]  # float32 elements: 16, 16, 48, 8, 8, 8 bytes
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate(sizes)]
    got = [[name for name, _ in b] for b in bucket_tensors(iter(named), 32)]
    assert got == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert list(bucket_tensors(iter([]), 32)) == []
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        next(bucket_tensors(iter(named), 0))

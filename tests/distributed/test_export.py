"""Streaming HF export from a live Megatron model (RL weight sync and mcore-to-hf), and
models with fewer KV groups than TP ranks.

Each spawn checks several layouts (see convert_workers): every rank must stream exactly the
HF checkpoint's tensors, in the same order, within the bucket size.
"""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file

from qmath_megatron.convert.commands import hf_to_mcore, mcore_to_hf
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.models.hf_reference import make_random_hf_model
from qmath_megatron.parallel.runtime import launch
from tests.distributed.convert_workers import export_cases_worker
from tests.distributed.workers import train_steps_worker

pytestmark = pytest.mark.distributed
BUCKET = 60_000  # bytes: several buckets per tiny model, and tensors larger than a bucket


@pytest.fixture(scope="module")
def kv_models(tmp_path_factory):
    """Fewer KV groups than TP ranks: 1 group (TP=2, TP=4) and 2 groups (TP=4), tied and
    untied, head_dim 32."""
    root = tmp_path_factory.mktemp("kv")
    out = {}
    for i, (base, tied) in enumerate(
        [("tiny-kv1", True), ("tiny-kv1", False), ("tiny-kv2", True), ("tiny-kv2", False)]
    ):
        flavor = get_flavor(base).replace(tie_word_embeddings=tied)
        out[base, tied] = make_random_hf_model(flavor, root / f"{base}-{tied}", seed=10 + i)
    return out


def _case(hf, tp=1, pp=1, vpp=None, lm_head=False, dtype=None, parity=False):
    return dict(
        hf=str(hf),
        tp=tp,
        pp=pp,
        vpp=vpp,
        include_lm_head=lm_head,
        bucket_bytes=BUCKET,
        dtype=dtype,
        parity=parity,
    )


@pytest.fixture(scope="module")
def world2(tiny_hf_models, kv_models):
    """(cases, per-rank results) of one 2-process spawn."""
    tied, untied = tiny_hf_models["tiny-tied"], tiny_hf_models["tiny-untied"]
    cases = [
        _case(tied, tp=2, lm_head=True),
        _case(untied, tp=2),
        _case(tied, pp=2, lm_head=True, dtype="bf16"),
        _case(untied, pp=2, vpp=2),
        _case(kv_models["tiny-kv1", True], tp=2, lm_head=True, parity=True),
        _case(kv_models["tiny-kv1", False], tp=2, parity=True),
    ]
    return cases, launch(export_cases_worker, 2, cases)


@pytest.fixture(scope="module")
def world4(kv_models):
    """(cases, per-rank results) of one 4-process spawn: TP=4 with 1 and 2 KV groups."""
    cases = [
        _case(kv_models[key], tp=4, lm_head=key[1], parity=True)
        for key in [("tiny-kv2", True), ("tiny-kv2", False), ("tiny-kv1", True)]
    ]
    cases.append(_case(kv_models["tiny-kv1", False], tp=2, pp=2, parity=True))
    return cases, launch(export_cases_worker, 4, cases)


def _check_exports(cases, per_rank):
    for i, case in enumerate(cases):
        reference = load_file(f"{case['hf']}/model.safetensors")
        tied = "lm_head.weight" not in reference
        expected = set(reference) | ({"lm_head.weight"} if case["include_lm_head"] else set())
        first = per_rank[0][i]
        where = f"case {i} ({case['hf']}, tp={case['tp']}, pp={case['pp']}, vpp={case['vpp']})"
        assert set(first["names"]) == expected and len(first["names"]) == len(expected), where
        if tied and case["include_lm_head"]:
            at = first["names"].index("model.embed_tokens.weight")
            assert first["names"][at + 1] == "lm_head.weight", where
        for ranks in per_rank:
            result = ranks[i]
            assert result["mismatched"] == [], (where, result["rank"], result["mismatched"])
            assert result["names"] == first["names"], (where, "ranks disagree on the order")
            assert result["buckets"] == first["buckets"], where
            for size, count in result["buckets"]:
                assert size <= case["bucket_bytes"] or count == 1, (where, size, count)
        assert len(first["buckets"]) > 2, where
        assert any(count == 1 and size > BUCKET for size, count in first["buckets"]), where


def _check_parity(cases, per_rank):
    for i, case in enumerate(cases):
        if not case["parity"]:
            continue
        diffs = [ranks[i]["logit_diff"] for ranks in per_rank if ranks[i]["logit_diff"] is not None]
        assert len(diffs) == 1, (i, diffs)  # TP rank 0 of the last stage
        assert diffs[0] <= 1e-4, (case, diffs[0])


def test_streamed_tensors_equal_hf_checkpoint_at_tp2_and_pp2(world2):
    """Tied/untied at TP=2, PP=2 (bf16 cast), PP=2 x VPP=2, and 1 KV group at TP=2."""
    _check_exports(*world2)


def test_logit_parity_tp2_one_kv_group(world2):
    _check_parity(*world2)


def test_tp4_two_and_one_kv_groups_parity_and_export(world4):
    _check_parity(*world4)
    _check_exports(*world4)


@pytest.fixture(scope="module")
def kv1_ckpt(kv_models, tmp_path_factory):
    """`qmath convert hf-to-mcore --tp 2` of a 1-KV-group model (the issue's failing case)."""
    out = tmp_path_factory.mktemp("kv1") / "ckpt"
    hf_to_mcore(kv_models["tiny-kv1", False], out, tp=2)
    return out


def test_kv_groups_below_tp_round_trip_is_exact(kv_models, kv1_ckpt, tmp_path):
    """Saved at TP=2 with 1 KV group, exported (resharded to TP=1): bit-identical HF."""
    back = tmp_path / "back"
    mcore_to_hf(kv1_ckpt, back)
    original = load_file(kv_models["tiny-kv1", False] / "model.safetensors")
    exported = load_file(back / "model.safetensors")
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and (exported[name] == tensor).all(), name


def test_kv_groups_below_tp_train_step_matches_tp1(kv1_ckpt):
    """One optimizer step at TP=2 with 1 KV group equals TP=1: loss and grad norm to 1e-6."""
    reference = launch(train_steps_worker, 1, str(kv1_ckpt), 1, 1, 2, True)[0]
    tp2 = launch(train_steps_worker, 2, str(kv1_ckpt), 2, 1, 2, True)[0]
    (loss0, norm0, _), (loss1, _, _) = reference
    (tp_loss0, tp_norm0, _), (tp_loss1, _, _) = tp2
    for a, b in [(loss0, tp_loss0), (norm0, tp_norm0), (loss1, tp_loss1)]:
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6), (a, b)
    assert abs(loss1 - loss0) > 1e-3  # the step changed the model

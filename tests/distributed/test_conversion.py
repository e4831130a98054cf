"""HF <-> Megatron conversion on the real distributed path (gloo, spawned ranks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qmath_megatron.checkpoint.model_checkpoint import (
    IncompleteCheckpointError,
    ModelMeta,
    load_model,
    resolve_checkpoint,
)
from qmath_megatron.convert.commands import hf_to_mcore, mcore_to_hf, verify

pytestmark = pytest.mark.distributed
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
FLAVORS = ["tiny-tied", "tiny-untied"]


@pytest.fixture(scope="module")
def converted(tiny_hf_models, tmp_path_factory):
    """{(flavor, tp, pp): checkpoint dir}, every flavor converted at every layout."""
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for flavor in FLAVORS:
        for tp, pp in LAYOUTS:
            ckpt = root / f"{flavor}-tp{tp}-pp{pp}"
            hf_to_mcore(tiny_hf_models[flavor], ckpt, tp=tp, pp=pp)
            out[flavor, tp, pp] = ckpt
    return out


@pytest.fixture(scope="module")
def direct_verify(converted, tiny_hf_models):
    """``get(flavor, tp, pp)``: verify() of the checkpoint converted at that layout, loaded
    at that layout (with Megatron's logits). Computed once per layout: the parity test and
    the resharding test's reference both need it (each call spawns TP x PP ranks)."""
    cache: dict = {}

    def get(flavor: str, tp: int, pp: int):
        if (flavor, tp, pp) not in cache:
            cache[flavor, tp, pp] = verify(
                tiny_hf_models[flavor], converted[flavor, tp, pp], return_logits=True
            )
        return cache[flavor, tp, pp]

    return get


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logit_parity_with_transformers(direct_verify, flavor, tp, pp):
    result = direct_verify(flavor, tp, pp)
    assert (result.tp, result.pp) == (tp, pp)
    assert result.max_abs_diff <= 1e-4, result
    assert result.top1_agreement == 1.0


@pytest.mark.parametrize("flavor", FLAVORS)
def test_round_trip_is_bit_identical(converted, tiny_hf_models, flavor, tmp_path):
    from transformers import AutoModelForCausalLM

    back = tmp_path / "back"
    mcore_to_hf(converted[flavor, 2, 2], back)
    original = load_file(tiny_hf_models[flavor] / "model.safetensors")
    exported = load_file(back / "model.safetensors")
    if json.loads((tiny_hf_models[flavor] / "config.json").read_text())["tie_word_embeddings"]:
        original.pop("lm_head.weight", None)
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(back, local_files_only=True)
    assert model.config.tie_word_embeddings == (flavor == "tiny-tied")
    assert not list(back.parent.glob("*.partial"))


@pytest.mark.parametrize("saved,loaded", [((2, 1), (1, 1)), ((1, 2), (1, 1)), ((2, 2), (1, 2))])
def test_resharding_gives_identical_logits(converted, tiny_hf_models, direct_verify, saved, loaded):
    """A checkpoint saved at one layout and loaded at another computes exactly what the
    checkpoint converted directly at the loading layout computes."""
    flavor = "tiny-untied"
    resharded = verify(
        tiny_hf_models[flavor],
        converted[(flavor, *saved)],
        tp=loaded[0],
        pp=loaded[1],
        return_logits=True,
    )
    direct = direct_verify(flavor, *loaded)
    assert torch.equal(resharded.logits, direct.logits)


def test_vpp_conversion_parity(tiny_hf_models, tmp_path):
    ckpt = tmp_path / "vpp"
    hf_to_mcore(tiny_hf_models["tiny-untied"], ckpt, tp=1, pp=2, vpp=2)
    result = verify(tiny_hf_models["tiny-untied"], ckpt, tp=1, pp=2, vpp=2, batch=2, seq=32)
    assert result.max_abs_diff <= 1e-4


def test_padded_vocab_rows_are_zero_and_recorded(converted):
    _, meta = resolve_checkpoint(converted["tiny-tied", 2, 1])
    assert meta.padded_vocab_size == 1024 and meta.tp == 2 and meta.flavor.name == "tiny-tied"


@pytest.mark.parametrize("damage", ["missing-distcp", "missing-common", "truncated-distcp"])
def test_incomplete_checkpoint_is_named_before_loading(converted, tmp_path, damage):
    """A checkpoint missing a shard or common.pt (a failed copy) is refused up front, by
    every entry point that loads one, naming the file; the CLI prints one line."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(converted["tiny-untied", 2, 2], ckpt)
    release = ckpt / "release"
    if damage == "missing-common":
        victim, message = release / "common.pt", "is missing"
        victim.unlink()
    else:
        victim = sorted(release.glob("*.distcp"))[-1]
        if damage == "missing-distcp":
            message = "is missing"
            victim.unlink()
        else:
            message = "truncated checkpoint shard"
            os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(IncompleteCheckpointError, match=message) as err:
        resolve_checkpoint(ckpt)
    assert str(victim) in str(err.value)
    meta_text = (release / "qmath_model.json").read_text()
    with pytest.raises(IncompleteCheckpointError, match=message):  # before touching the model
        load_model([], release, ModelMeta.from_json(meta_text), current_spec="local")
    if damage == "missing-common":
        out = tmp_path / "hf"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "qmath_megatron",
                "convert",
                "mcore-to-hf",
                "--ckpt",
                str(ckpt),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"qmath: error: incomplete checkpoint: {victim} is missing"
        ]
        assert not out.exists()

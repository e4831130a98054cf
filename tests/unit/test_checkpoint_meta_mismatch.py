"""A checkpoint whose `qmath_model.json` disagrees with its shards (a hand-edited or mixed-up
file) is one `qmath: error:` line naming the directory and the first mismatching tensor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from qmath_megatron.checkpoint.model_checkpoint import MODEL_META_FILE
from qmath_megatron.convert.commands import hf_to_mcore


@pytest.fixture(scope="module")
def mcore_ckpt(tiny_hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "mcore"
    hf_to_mcore(tiny_hf_models["tiny-untied"], out, tp=1)
    return out


@pytest.mark.parametrize(
    ("field", "factor", "tensor"),
    [("ffn_hidden_size", 2, "linear_fc1.weight"), ("num_layers", 2, "decoder.layers.")],
)
def test_metadata_disagreeing_with_the_shards_is_one_line(
    mcore_ckpt, tmp_path, field, factor, tensor
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mcore_ckpt, ckpt)
    meta_file = ckpt / "release" / MODEL_META_FILE
    meta = json.loads(meta_file.read_text())
    meta["flavor"][field] *= factor
    meta_file.write_text(json.dumps(meta))
    out = tmp_path / "hf"
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "convert", "mcore-to-hf"]
        + ["--ckpt", str(ckpt), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("qmath: error:")
    assert f"{ckpt / 'release'}: its shards do not match {MODEL_META_FILE}" in last
    assert "shape mismatch" in last and tensor in last
    assert not out.exists()

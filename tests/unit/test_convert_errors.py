"""Bad conversion input gets one clear line naming the problem, and no output directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from qmath_megatron.convert.commands import validate_hf_dir
from qmath_megatron.convert.hf_io import ConversionError, write_safetensors_shards


def _qmath(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qmath_megatron", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def hf_copy(tiny_hf_models, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf_models["tiny-untied"], dst)
    return dst


def _edit_tensors(hf_dir, edit) -> None:
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_copy):
    _edit_tensors(hf_copy, lambda t: t.pop("model.layers.2.self_attn.k_proj.bias"))
    with pytest.raises(
        ConversionError, match=r"missing tensor\(s\).*layers\.2\.self_attn\.k_proj\.bias"
    ):
        validate_hf_dir(hf_copy)


def test_shape_mismatch_is_named(hf_copy):
    def edit(t):
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(255, 96)

    _edit_tensors(hf_copy, edit)
    with pytest.raises(
        ConversionError,
        match=(
            r"shape mismatch for model\.layers\.1\.mlp\.up_proj\.weight"
            r".*\(255, 96\).*\(256, 96\)"
        ),
    ):
        validate_hf_dir(hf_copy)


def test_unexpected_tensor_is_named(hf_copy):
    _edit_tensors(
        hf_copy, lambda t: t.update({"model.layers.9.input_layernorm.weight": torch.ones(96)})
    )
    with pytest.raises(ConversionError, match="does not have: model.layers.9"):
        validate_hf_dir(hf_copy)


def test_pytorch_bin_only_gets_a_hint(hf_copy):
    (hf_copy / "model.safetensors").rename(hf_copy / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="safe_serialization"):
        validate_hf_dir(hf_copy)


def test_sharded_safetensors_with_index_are_read(hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    (hf_copy / "model.safetensors").unlink()
    names = write_safetensors_shards(hf_copy, iter(tensors.items()), max_shard_bytes=50_000)
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(names) == set(tensors)
    flavor, dtype = validate_hf_dir(hf_copy)
    assert flavor.name == "tiny-untied" and dtype == torch.float32


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tp", "4"], "TP=4 does not divide the 6 attention heads"),
        (["--pp", "3"], "cannot be split evenly"),
    ],
)
def test_cli_layout_errors_are_one_line(hf_copy, tmp_path, args, message):
    out = tmp_path / "out"
    proc = _qmath("convert", "hf-to-mcore", "--hf", str(hf_copy), "--out", str(out), *args)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_cli_unknown_architecture(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    proc = _qmath("convert", "hf-to-mcore", "--hf", str(hf_copy), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1 and "unknown architecture" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_refuses_to_overwrite_and_names_non_checkpoints(hf_copy, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    proc = _qmath("convert", "hf-to-mcore", "--hf", str(hf_copy), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and "exists and is not empty; pass --overwrite" in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    proc = _qmath(
        "convert", "mcore-to-hf", "--ckpt", str(tmp_path / "out"), "--out", str(tmp_path / "hf_out")
    )
    assert proc.returncode == 1 and "is not a qmath Megatron checkpoint" in proc.stderr
    assert not (tmp_path / "hf_out").exists()


def test_killed_conversion_leaves_no_complete_looking_output(hf_copy, tmp_path):
    """Kill the command while it works: no --out appears; a rerun succeeds."""
    out = tmp_path / "ckpt"
    partial = tmp_path / "ckpt.partial"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmath_megatron",
            "convert",
            "hf-to-mcore",
            "--hf",
            str(hf_copy),
            "--out",
            str(out),
            "--tp",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert partial.exists(), "conversion never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    rerun = _qmath("convert", "hf-to-mcore", "--hf", str(hf_copy), "--out", str(out), "--tp", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "release" / "qmath_model.json").is_file() and not partial.exists()


@pytest.mark.parametrize("cut", ["half", "header"])
def test_truncated_safetensors_is_named(hf_copy, cut):
    path = hf_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2 if cut == "half" else 100)
    with pytest.raises(ConversionError, match=f"{path}.*truncated or corrupt"):
        validate_hf_dir(hf_copy)


def test_missing_shard_of_an_index_is_named(hf_copy):
    tensors = load_file(hf_copy / "model.safetensors")
    (hf_copy / "model.safetensors").unlink()
    write_safetensors_shards(hf_copy, iter(tensors.items()), max_shard_bytes=50_000)
    second = sorted(hf_copy.glob("model-*-of-*.safetensors"))[1]
    second.unlink()
    with pytest.raises(ConversionError, match=f"{second} does not exist"):
        validate_hf_dir(hf_copy)


def test_cli_truncated_safetensors_is_one_line(hf_copy, tmp_path):
    path = hf_copy / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    proc = _qmath("convert", "hf-to-mcore", "--hf", str(hf_copy), "--out", str(tmp_path / "o"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("qmath: error: ") and str(path) in line and "truncated" in line
    assert not (tmp_path / "o").exists()


def test_write_output_publishes_whole_or_nothing(tmp_path):
    """convert.commands.write_output, the output step of every conversion (policy and RM):
    a refusal before any work, nothing left after a failure, the directory on success;
    copy_tokenizer_files leaves out what it is told to and never replaces the export's own
    files (a model directory given as --tokenizer carries its own config.json)."""
    from qmath_megatron.convert.commands import copy_tokenizer_files, write_output

    out, partial = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        write_output(out, False, lambda tmp: pytest.fail("fill ran"))

    def broken(tmp):
        (tmp / "half.bin").write_text("x")
        raise ConversionError("worker failed")

    with pytest.raises(ConversionError, match="worker failed"):
        write_output(out, True, broken)
    assert (out / "keep.txt").is_file() and not partial.exists()
    tok = tmp_path / "tok"
    tok.mkdir()
    for name in (
        "tokenizer.json",
        "config.json",
        "merges.txt",
        "weights.bin",
        "generation_config.json",
        "special_tokens_map.json",
        "model.safetensors.index.json",
    ):
        (tok / name).write_text(name)

    def fill(tmp):
        (tmp / "config.json").write_text("ours")
        (tmp / "generation_config.json").write_text("ours too")
        copy_tokenizer_files(tok, tmp, skip=("special_tokens_map.json",))
        return 7

    assert write_output(out, True, fill) == 7
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "tokenizer.json",
    ]
    # A model directory given as the tokenizer never replaces what the export wrote.
    assert (out / "config.json").read_text() == "ours"
    assert (out / "generation_config.json").read_text() == "ours too"
    assert (out / "config.json").read_text() == "ours" and not partial.exists()


def test_model_heads_dispatch_through_the_registry(tmp_path):
    """convert/ converts the LM head itself and every other head through the registry:
    the reward model registers `score` (its HF architecture names its directories), an
    unknown head is a ConversionError naming the known ones, and a head cannot be taken
    over by a second converter."""
    import qmath_megatron.reward_model  # registers the score head
    from qmath_megatron.convert import heads
    from qmath_megatron.convert.commands import _head_implementation
    from qmath_megatron.reward_model import convert as rm_convert

    rm_dir, lm_dir, bad_dir = tmp_path / "rm", tmp_path / "lm", tmp_path / "bad"
    for d, archs in ((rm_dir, ["Qwen2ForRewardModel"]), (lm_dir, ["Qwen2ForCausalLM"])):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": archs}))
    bad_dir.mkdir()
    (bad_dir / "config.json").write_text("[1, 2")
    assert heads.hf_dir_head(rm_dir).head == qmath_megatron.reward_model.SCORE_HEAD == "score"
    assert heads.hf_dir_head(lm_dir) is None and heads.hf_dir_head(bad_dir) is None
    assert heads.hf_dir_head(tmp_path / "missing") is None
    assert _head_implementation("score", "ckpt") is rm_convert
    assert _head_implementation("lm", "ckpt") is None
    with pytest.raises(ConversionError, match=r"ckpt holds a model with head 'value'.*lm, score"):
        _head_implementation("value", "ckpt")
    registered = heads.find_head("score")
    heads.register_head(registered)  # again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        heads.register_head(heads.HeadConverter("score", "Qwen2ForRewardModel", "elsewhere"))
    with pytest.raises(ValueError, match="language model"):
        heads.register_head(heads.HeadConverter("lm", "Qwen2ForCausalLM", "elsewhere"))
    assert heads.find_head("score") is registered


def test_qmath_convert_knows_every_head_in_a_fresh_process():
    """`qmath` builds only the parser of the command it runs: `qmath convert` must register
    the reward model's head itself (an RM checkpoint was refused as an unknown head)."""
    code = (
        "from qmath_megatron.cli import build_parser; "
        "from qmath_megatron.convert.heads import registered_heads; "
        "build_parser(['convert', 'mcore-to-hf']); print(registered_heads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['score']"

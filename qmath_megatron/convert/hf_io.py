"""Reading and writing Hugging Face Qwen2 model directories (config.json + safetensors)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.models.flavors import FLAVORS, QwenFlavor
from qmath_megatron.models.hf_config import HF_DTYPE_NAMES

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
MAX_SHARD_BYTES = 5 * 1024**3  # what `save_pretrained` uses for large models

_NAME_DTYPES = {v: k for k, v in HF_DTYPE_NAMES.items()}


class ConversionError(ValueError):
    """Bad conversion input, with a message that names the problem."""


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConversionError(f"HF model directory not found: {hf_dir}")
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}: not a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None


def rope_theta_of(config: dict[str, Any]) -> float:
    """RoPE base from a transformers 4.x (``rope_theta``) or 5.x (``rope_parameters``) config."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return 10000.0  # transformers' Qwen2 default


def flavor_from_hf_config(config: dict[str, Any], name: str | None = None) -> QwenFlavor:
    """Architecture of an HF Qwen2 config; refuses what the mapping cannot represent."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type != "qwen2" or (archs and archs[0] not in SUPPORTED_ARCHITECTURES):
        raise ConversionError(
            f"unknown architecture {archs or model_type!r}: supported are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'qwen2')"
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if scaling or rope_type not in (None, "default"):
        raise ConversionError(f"RoPE scaling {scaling or rope_type!r} is not supported")
    if config.get("use_sliding_window"):
        raise ConversionError("sliding-window attention (use_sliding_window=true) is not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r} is not supported (need silu)")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        head_dim = config.get("head_dim")
        if head_dim is not None and int(head_dim) != hidden // heads:
            raise ConversionError(f"head_dim {head_dim} != hidden_size / num_attention_heads")
        fields = dict(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            rope_theta=rope_theta_of(config),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )
    except KeyError as exc:
        raise ConversionError(f"config.json lacks required field {exc.args[0]!r}") from None
    # Name it after a published flavor when the architecture is identical.
    for flavor in FLAVORS.values():
        if all(getattr(flavor, k) == v for k, v in fields.items()):
            return flavor
    return QwenFlavor(name=name or "custom-qwen2", **fields)


def hf_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in _NAME_DTYPES:
        raise ConversionError(f"unsupported dtype {name!r} in config.json")
    return _NAME_DTYPES[name]


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safe_open`` that turns a truncated/corrupt/missing file into a ConversionError
    naming the file (safetensors checks at open that the header covers the file exactly,
    so a cut-off file is caught here, before any tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"safetensors file {path} does not exist")
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise ConversionError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    with handle as f:
        yield f


class SafetensorsReader:
    """Lazy access to the tensors of an HF directory: one tensor in memory at a time."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / SAFETENSORS_INDEX
        single = self.dir / SINGLE_SAFETENSORS
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a valid safetensors index: {exc}") from None
        elif single.is_file():
            weight_map = {}
            with open_safetensors(single) as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_SAFETENSORS)
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = f" (found {bins[0]}: re-save with safe_serialization=True)" if bins else ""
            raise ConversionError(f"no safetensors weights in {self.dir}{hint}")
        self.weight_map = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise ConversionError(f"missing tensor {name!r} in {self.dir}")
        path = self.dir / file
        if not path.is_file():
            raise ConversionError(f"{path} (listed in the index for {name}) does not exist")
        # Open per tensor: a handle kept open keeps every page read so far mapped into this
        # process (and counted in its memory) until conversion ends.
        with open_safetensors(path) as f:
            return f.get_tensor(name)


def write_safetensors_shards(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[str]:
    """Write tensors in order into ``model-0000i-of-0000n.safetensors`` files + index.

    Holds at most one shard's worth of tensors; returns the tensor names written.
    """
    from safetensors.torch import save_file

    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    buffer: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buffer, size
        if not buffer:
            return
        tmp_name = f"shard-{len(shards):05d}.tmp"
        save_file(buffer, str(out_dir / tmp_name), metadata={"format": "pt"})
        shards.append(list(buffer))
        buffer, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if buffer and size + nbytes > max_shard_bytes:
            flush()
        buffer[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    names = [name for shard in shards for name in shard]
    if n == 1:
        os.replace(out_dir / "shard-00000.tmp", out_dir / SINGLE_SAFETENSORS)
        return names
    for i, shard in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / f"shard-{i:05d}.tmp", out_dir / final)
        weight_map.update(dict.fromkeys(shard, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names

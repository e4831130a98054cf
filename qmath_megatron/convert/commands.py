"""``qmath convert``: Hugging Face <-> Megatron torch_dist checkpoints, and parity checks.

Each command starts the processes it needs itself (TP x PP CPU workers with gloo), so a
plain shell command converts at any layout. Conversion runs on CPU on purpose: it is
memory-bound, must work on login/CPU nodes, and never competes with training for GPUs.
Outputs are written under a temporary sibling name and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from qmath_megatron.checkpoint.model_checkpoint import (
    ModelMeta,
    load_model,
    publish_directory,
    resolve_checkpoint,
    save_model,
    write_tracker,
)
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.convert import mapping
from qmath_megatron.convert.export import iter_hf_tensors
from qmath_megatron.convert.heads import LM_HEAD, find_head, hf_dir_head, registered_heads
from qmath_megatron.convert.hf_io import (
    ConversionError,
    SafetensorsReader,
    flavor_from_hf_config,
    hf_dtype,
    open_safetensors,
    read_hf_config,
    write_safetensors_shards,
)
from qmath_megatron.models.builder import (
    build_model,
    build_transformer_config,
    check_parallel_fits,
    padded_vocab_size,
)
from qmath_megatron.models.flavors import QwenFlavor
from qmath_megatron.models.forward import forward_logits
from qmath_megatron.models.hf_config import hf_config_from_flavor
from qmath_megatron.parallel.runtime import initialize, launch

logger = logging.getLogger(__name__)

_DTYPE_BY_TORCH = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _cpu_launch(fn, nprocs: int, *args: Any) -> list[Any]:
    """Run conversion workers on CPU even on a GPU node (see module docstring)."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return launch(fn, nprocs, *args)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _build(flavor: QwenFlavor, parallel: ParallelConfig, dtype: str, padded_vocab: int) -> list:
    config = build_transformer_config(
        flavor, parallel, PrecisionConfig(dtype=dtype), perform_initialization=False
    )
    return build_model(flavor, config, padded_vocab=padded_vocab, use_te=False)


def _global_layer(chunk, local_index: int | None) -> int | None:
    if local_index is None:
        return None
    return chunk.decoder.layers[local_index].layer_number - 1


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _prepare_output(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output {out} exists and is not empty; pass --overwrite")
    tmp = _partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier run's leftovers
    return tmp


_T = TypeVar("_T")


def write_output(out: Path, overwrite: bool, fill: Callable[[Path], _T]) -> _T:
    """``fill(tmp)`` builds a conversion's output in ``tmp``, a fresh sibling of ``out``,
    which is then renamed to ``out``: an interrupted or failed run (also Ctrl-C) leaves
    nothing that looks complete. FileExistsError before any work when ``out`` is not
    empty and ``overwrite`` is false. Returns what ``fill`` returns."""
    tmp = _prepare_output(out, overwrite)
    tmp.mkdir(parents=True)
    try:
        result = fill(tmp)
        publish_directory(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def copy_tokenizer_files(tokenizer: str | Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The tokenizer's files (``.json``, ``.txt``, ``.jinja``, ``.model``) of directory
    ``tokenizer`` into an exported HF directory, except the names in ``skip`` and the files
    the export already wrote: ``--tokenizer`` may name a whole model directory, whose
    ``config.json`` / ``generation_config.json`` must not replace the exported ones, and
    its weight index (``*.index.json``) would point at shards the export does not have."""
    for file in Path(tokenizer).iterdir():
        if (
            file.is_file()
            and file.suffix in (".json", ".txt", ".jinja", ".model")
            and not file.name.endswith(".index.json")
            and file.name not in skip
            and not (dst / file.name).exists()
        ):
            shutil.copy2(file, dst / file.name)


# ---------------------------------------------------------------------------- validation


def expected_hf_shapes(flavor: QwenFlavor) -> dict[str, tuple[int, ...]]:
    h, f, v = flavor.hidden_size, flavor.ffn_hidden_size, flavor.vocab_size
    q, kv = flavor.num_attention_heads * flavor.head_dim, flavor.num_query_groups * flavor.head_dim
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(flavor.num_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    if not flavor.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def check_hf_tensors(
    hf_dir: Path,
    expected: dict[str, tuple[int, ...]],
    model: str,
    allowed_extra: set[str] = frozenset(),
) -> None:
    """ConversionError naming the first problem among the tensors of ``hf_dir``: a tensor
    of ``expected`` missing, one that ``model`` (e.g. "a 2-layer Qwen2") does not have
    (``allowed_extra`` excepted), or a shape other than ``expected``'s. Reads headers only,
    each file once."""
    reader = SafetensorsReader(hf_dir)
    present = reader.names()
    missing = sorted(set(expected) - present)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConversionError(f"missing tensor(s) in {hf_dir}: {', '.join(missing[:5])}{more}")
    unexpected = sorted(present - set(expected) - allowed_extra)
    if unexpected:
        raise ConversionError(
            f"tensor(s) in {hf_dir} that {model} does not have: {', '.join(unexpected[:5])}"
        )
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(reader.weight_map[name], []).append(name)
    for file, names in by_file.items():
        with open_safetensors(hf_dir / file) as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ConversionError(
                        f"shape mismatch for {name}: checkpoint has {shape}, config.json "
                        f"implies {expected[name]}"
                    )


def validate_hf_dir(hf_dir: Path) -> tuple[QwenFlavor, torch.dtype]:
    """Check an HF directory before any worker starts: every problem named up front."""
    config = read_hf_config(hf_dir)
    flavor = flavor_from_hf_config(config)
    extra = {"lm_head.weight"} if flavor.tie_word_embeddings else set()
    check_hf_tensors(
        hf_dir, expected_hf_shapes(flavor), f"a {flavor.num_layers}-layer Qwen2", extra
    )
    return flavor, hf_dtype(config)


# ---------------------------------------------------------------------------- HF -> mcore


@dataclass
class ConvertResult:
    out: str
    seconds: float
    tensors: int


def load_hf_weights(chunks: list, hf_dir: str | Path, flavor: QwenFlavor, padded_vocab: int) -> int:
    """Copy an HF directory's tensors into this rank's (TP/PP/VPP) model chunks.

    The one HF -> Megatron code path (``qmath convert hf-to-mcore`` and tests): each rank
    reads only the HF tensors its own parameters need and keeps its TP slice. Returns the
    number of parameters copied.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    reader = SafetensorsReader(hf_dir)
    copied = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            match = mapping.match_mcore(name)
            if match is None:
                raise ConversionError(f"no mapping rule for Megatron parameter {name!r}")
            rule, local = match
            names = mapping.hf_names(rule, _global_layer(chunk, local), flavor)
            hf = [reader.get(n).to(param.dtype) for n in names]
            shard = mapping.to_mcore_shard(
                rule, hf, flavor, padded_vocab=padded_vocab, tp_rank=tp_rank, tp_size=tp_size
            )
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(
                    f"shape mismatch for {name} (from {', '.join(names)}): got "
                    f"{tuple(shard.shape)}, model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(shard)
            copied += 1
            del hf, shard
    return copied


def _hf_to_mcore_worker(
    hf_dir: str, tmp_dir: str, flavor_dict: dict, parallel: ParallelConfig, dtype: str
) -> int:
    flavor = QwenFlavor.from_dict(flavor_dict)
    initialize(parallel)
    padded = padded_vocab_size(flavor.vocab_size, parallel.tp)
    chunks = _build(flavor, parallel, dtype, padded)
    copied = load_hf_weights(chunks, hf_dir, flavor, padded)
    meta = ModelMeta(
        flavor=flavor,
        padded_vocab_size=padded,
        dtype=dtype,
        layer_spec="local",
        tp=parallel.tp,
        pp=parallel.pp,
        vpp=parallel.vpp,
        iteration="release",
        source=str(hf_dir),
    )
    save_model(chunks, Path(tmp_dir) / "release", meta)
    return copied


def _head_implementation(head: str, ckpt: str | Path) -> Any:
    """None for the LM head, else the module converting checkpoints of ``head``."""
    if head == LM_HEAD:
        return None
    converter = find_head(head)
    if converter is None:
        known = ", ".join([LM_HEAD, *registered_heads()])
        raise ConversionError(
            f"{ckpt} holds a model with head {head!r}; known heads: {known} (a stage package "
            "registers its head when imported: `import qmath_megatron.reward_model` for 'score')"
        )
    return converter.implementation()


def hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
) -> ConvertResult:
    """HF safetensors directory -> Megatron torch_dist checkpoint at TP x PP (x VPP); a
    directory in a registered head's layout (:mod:`~qmath_megatron.convert.heads`, e.g.
    ``Qwen2ForRewardModel``) converts through that head's converter."""
    head = hf_dir_head(hf_dir)
    if head is not None:
        return head.implementation().hf_to_mcore(
            hf_dir, out, tp=tp, pp=pp, vpp=vpp, dtype=dtype, overwrite=overwrite
        )
    return convert_hf_dir(
        hf_dir,
        out,
        validate_hf_dir,
        _hf_to_mcore_worker,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dtype=dtype,
        overwrite=overwrite,
    )


def convert_hf_dir(
    hf_dir: str | Path,
    out: str | Path,
    validate: Callable[[Path], tuple[QwenFlavor, torch.dtype]],
    worker: Callable[..., int],
    *,
    tp: int,
    pp: int,
    vpp: int | None,
    dtype: str,
    overwrite: bool,
) -> ConvertResult:
    """The HF -> Megatron driver (policy and reward model): ``validate(hf_dir)`` checks the
    input and returns (flavor, stored dtype) before anything starts; then ``tp * pp`` CPU
    processes run ``worker(hf_dir, tmp_dir, flavor_dict, parallel, dtype)``, each saving its
    part of the ``release`` iteration and returning the tensors it copied."""
    start = time.time()
    hf_dir, out = Path(hf_dir), Path(out)
    flavor, src_dtype = validate(hf_dir)
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    check_parallel_fits(flavor, parallel)
    dtype = _DTYPE_BY_TORCH[src_dtype] if dtype == "auto" else dtype
    PrecisionConfig(dtype=dtype)  # validates the name

    def fill(tmp: Path) -> int:
        counts = _cpu_launch(
            worker, tp * pp, str(hf_dir), str(tmp), flavor.to_dict(), parallel, dtype
        )
        write_tracker(tmp, "release")
        return sum(counts)

    # The count first: arguments evaluate left to right, and the time must include the work.
    tensors = write_output(out, overwrite, fill)
    return ConvertResult(str(out), time.time() - start, tensors)


# ---------------------------------------------------------------------------- mcore -> HF


def _mcore_to_hf_worker(iter_dir: str, tmp_dir: str, dtype: str | None) -> int:
    _, meta = resolve_checkpoint(iter_dir)
    flavor = meta.flavor
    parallel = ParallelConfig()
    initialize(parallel)
    chunks = _build(flavor, parallel, meta.dtype, meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    out_dtype = PrecisionConfig(dtype=dtype).torch_dtype if dtype else None
    # The same stream RL weight sync uses; `release` frees each Megatron parameter once
    # its HF tensors exist: peak memory stays at one model plus one output shard.
    # Cloned: safetensors refuses tensors that share storage (gate/up are two views of
    # one linear_fc1 weight).
    tensors = (
        (name, t.clone())
        for name, t in iter_hf_tensors(
            chunks, flavor, meta.padded_vocab_size, dtype=out_dtype, release=True
        )
    )
    return len(write_safetensors_shards(Path(tmp_dir), tensors))


def mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Megatron checkpoint (any TP/PP it was saved at) -> HF directory for ``from_pretrained``;
    a checkpoint of another head (e.g. a reward model) in that head's published layout."""
    iter_dir, meta = resolve_checkpoint(ckpt)
    head = _head_implementation(meta.head, ckpt)
    if head is not None:
        return head.mcore_to_hf(ckpt, out, dtype=dtype, tokenizer=tokenizer, overwrite=overwrite)
    torch_dtype = PrecisionConfig(dtype=dtype or meta.dtype).torch_dtype
    config = hf_config_from_flavor(meta.flavor, torch_dtype)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    files = {"config.json": config, "generation_config.json": gen}
    return export_hf_dir(
        iter_dir,
        out,
        _mcore_to_hf_worker,
        dtype=dtype,
        tokenizer=tokenizer,
        overwrite=overwrite,
        files=files,
    )


def export_hf_dir(
    iter_dir: str | Path,
    out: str | Path,
    worker: Callable[..., int],
    *,
    dtype: str | None,
    tokenizer: str | Path | None,
    overwrite: bool,
    files: dict[str, dict],
    tokenizer_skip: tuple[str, ...] = (),
) -> ConvertResult:
    """The Megatron -> HF driver (policy and reward model): one CPU process runs
    ``worker(iter_dir, tmp_dir, dtype)``, which writes the safetensors and returns how many
    tensors; then the JSON ``files`` (name -> content, e.g. ``config.json``) and the
    tokenizer's files (but ``tokenizer_skip``) join them before ``out`` is published."""
    start = time.time()

    def fill(tmp: Path) -> int:
        (count,) = _cpu_launch(worker, 1, str(iter_dir), str(tmp), dtype)
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp, tokenizer_skip)
        return count

    tensors = write_output(Path(out), overwrite, fill)
    return ConvertResult(str(out), time.time() - start, tensors)


# ---------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tokens: int
    tp: int
    pp: int
    logits: torch.Tensor | None = None  # Megatron's logits, when asked for

    def passed(self, atol: float) -> bool:
        return self.max_abs_diff <= atol

    def report(self, atol: float) -> dict[str, Any]:
        return verify_report(self, atol, drop="logits")

    def summary(self, atol: float) -> str:
        return (
            f"TP={self.tp} PP={self.pp}: max |logit diff| {self.max_abs_diff:.3e} "
            f"(mean {self.mean_abs_diff:.3e}), top-1 agreement {self.top1_agreement:.2%} over "
            f"{self.tokens} tokens -> {'PASS' if self.passed(atol) else 'FAIL'} (atol {atol:g})"
        )


def verify_report(result: Any, atol: float, *, drop: str, **extra: Any) -> dict[str, Any]:
    """The JSON report of a verify result (``qmath convert verify --json``): its fields but
    ``drop`` (the tensors), ``atol``, ``passed``, then ``extra``."""
    report = {**vars(result), "atol": atol, "passed": result.passed(atol), **extra}
    report.pop(drop)
    return report


def _verify_worker(
    hf_dir: str,
    iter_dir: str,
    parallel: ParallelConfig,
    batch: int,
    seq: int,
    seed: int,
    return_logits: bool = False,
) -> dict | None:
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    _, meta = resolve_checkpoint(iter_dir)
    flavor = meta.flavor
    initialize(parallel)
    if meta.padded_vocab_size % parallel.tp:
        raise ConversionError(
            f"checkpoint vocab {meta.padded_vocab_size} is not divisible by TP={parallel.tp}"
        )
    chunks = _build(flavor, parallel, meta.dtype, meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    for chunk in chunks:
        chunk.float().eval()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, flavor.vocab_size, (batch, seq), generator=gen)
    micro = parallel.pp if parallel.vpp else 1
    logits = forward_logits(chunks, tokens, num_microbatches=micro if batch % micro == 0 else 1)
    if logits is None or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    with torch.no_grad():
        ref = model(tokens).logits.float()
    ours = logits[..., : flavor.vocab_size].float()
    diff = (ours - ref).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "tokens": tokens.numel(),
        "tp": parallel.tp,
        "pp": parallel.pp,
        "logits": ours if return_logits else None,
    }


def verify(
    hf_dir: str | Path,
    ckpt: str | Path,
    *,
    tp: int | None = None,
    pp: int | None = None,
    vpp: int | None = None,
    batch: int = 2,
    seq: int = 64,
    seed: int = 0,
    return_logits: bool = False,
) -> Any:
    """Same random tokens through HF and Megatron (at TP x PP, default: as saved), fp32: a
    :class:`VerifyResult`. A checkpoint of another head verifies through that head's
    converter (its own result type; ``return_logits`` is the LM head's)."""
    iter_dir, meta = resolve_checkpoint(ckpt)
    head = _head_implementation(meta.head, ckpt)
    if head is not None:
        return head.verify(hf_dir, ckpt, tp=tp, pp=pp, vpp=vpp, batch=batch, seq=seq, seed=seed)
    hf_flavor, _ = validate_hf_dir(Path(hf_dir))  # names a truncated/missing tensor file
    result = run_verify(
        _verify_worker,
        hf_dir,
        hf_flavor,
        iter_dir,
        meta,
        tp=tp,
        pp=pp,
        vpp=vpp,
        args=(batch, seq, seed, return_logits),
    )
    return VerifyResult(**result)


def run_verify(
    worker: Callable[..., dict | None],
    hf_dir: str | Path,
    hf_flavor: QwenFlavor,
    iter_dir: str | Path,
    meta: ModelMeta,
    *,
    tp: int | None,
    pp: int | None,
    vpp: int | None,
    args: tuple,
) -> dict:
    """The verify driver (policy and reward model): refuses an HF directory whose config
    differs from the checkpoint's flavor, then runs ``worker(hf_dir, iter_dir, parallel,
    *args)`` on TP x PP CPU processes (default: the checkpoint's layout); the one result
    that is not None (the reporting rank's)."""
    mismatched = [
        k
        for k, v in hf_flavor.to_dict().items()
        if k not in ("name", "published_params") and getattr(meta.flavor, k) != v
    ]
    if mismatched:
        raise ConversionError(f"HF config and checkpoint differ in {', '.join(mismatched)}")
    parallel = ParallelConfig(tp=tp or meta.tp, pp=pp or meta.pp, vpp=vpp)
    check_parallel_fits(meta.flavor, parallel)
    results = _cpu_launch(
        worker, parallel.tp * parallel.pp, str(hf_dir), str(iter_dir), parallel, *args
    )
    (result,) = [r for r in results if r is not None]
    return result

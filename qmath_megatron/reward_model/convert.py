"""Reward-model conversion: the published HF layout <-> Megatron ``torch_dist``, and verify.

``qmath convert hf-to-mcore / mcore-to-hf / verify`` dispatch here when the input is a
reward model (an HF ``config.json`` naming ``Qwen2ForRewardModel``, or a checkpoint whose
``qmath_model.json`` has ``head: "score"``), through the conversion's registry of heads
(:mod:`qmath_megatron.convert.heads`; :mod:`qmath_megatron.reward_model` registers it).
The backbone goes through the same declarative mapping as the policy
(:mod:`qmath_megatron.convert.mapping`: the RM's backbone
tensors carry the ``Qwen2ForCausalLM`` names under ``model.``); the head's four tensors are
sharded like Megatron's MLP (:func:`head_shard`, :func:`head_full`). ``verify`` compares
the Megatron model's scores with the plain PyTorch reference
(:class:`~qmath_megatron.reward_model.hf.Qwen2RewardModelReference`) on random sequences
of random lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qmath_megatron.checkpoint.model_checkpoint import (
    ModelMeta,
    load_model,
    resolve_checkpoint,
    save_model,
)
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.convert import mapping
from qmath_megatron.convert.commands import (
    ConvertResult,
    check_hf_tensors,
    convert_hf_dir,
    expected_hf_shapes,
    export_hf_dir,
    run_verify,
    verify_report,
)
from qmath_megatron.convert.hf_io import (
    ConversionError,
    SafetensorsReader,
    flavor_from_hf_config,
    hf_dtype,
    read_hf_config,
    write_safetensors_shards,
)
from qmath_megatron.models.builder import padded_vocab_size
from qmath_megatron.models.flavors import QwenFlavor
from qmath_megatron.parallel.runtime import initialize
from qmath_megatron.reward_model import SCORE_HEAD
from qmath_megatron.reward_model.hf import (
    HEAD_TENSORS,
    Qwen2RewardModelReference,
    backbone_config,
    head_shapes,
    is_reward_model_config,
    reward_model_hf_config,
)
from qmath_megatron.reward_model.scoring import megatron_scores

# --------------------------------------------------------------------------- head sharding


def head_shard(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s slice of a head tensor (HF name == Megatron name):
    ``score.0`` column-parallel (weight rows and bias split), ``score.2.weight``
    row-parallel (columns split), ``score.2.bias`` replicated."""
    if name in ("score.0.weight", "score.0.bias"):
        dim = 0
    elif name == "score.2.weight":
        dim = 1
    elif name == "score.2.bias":
        return full
    else:
        raise ConversionError(f"not a score-head tensor: {name!r}")
    if full.shape[dim] % tp_size:
        raise ConversionError(f"{name} {tuple(full.shape)} does not split over TP={tp_size}")
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


def head_full(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`head_shard` (shards in TP-rank order)."""
    if name == "score.2.bias":
        return shards[0]
    return torch.cat(shards, dim=1 if name == "score.2.weight" else 0)


def backbone_rules() -> list[mapping.TensorRule]:
    """The policy's mapping rules without the LM head."""
    return [r for r in mapping.RULES if r.mcore != "output_layer.weight"]


# --------------------------------------------------------------------------- validation


def validate_rm_dir(hf_dir: Path) -> tuple[QwenFlavor, torch.dtype]:
    """Check an HF reward-model directory up front: config, every tensor and its shape."""
    config = read_hf_config(hf_dir)
    if not is_reward_model_config(config):
        raise ConversionError(f"{hf_dir} is not a Qwen2ForRewardModel directory")
    flavor = flavor_from_hf_config(backbone_config(config))
    expected = {k: v for k, v in expected_hf_shapes(flavor).items() if k != "lm_head.weight"}
    expected.update(head_shapes(flavor.hidden_size))
    check_hf_tensors(hf_dir, expected, f"a {flavor.num_layers}-layer Qwen2ForRewardModel")
    return flavor, hf_dtype(config)


def load_hf_into(
    chunks: list,
    hf_dir: str | Path,
    flavor: QwenFlavor,
    padded_vocab: int,
    tp_rank: int,
    tp_size: int,
) -> int:
    """Copy an HF reward model's tensors into this rank's chunks; returns tensors copied."""
    reader = SafetensorsReader(hf_dir)
    copied = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name.startswith(SCORE_HEAD + "."):
                names = [name]
                shard = head_shard(name, reader.get(name), tp_rank, tp_size)
            else:
                match = mapping.match_mcore(name)
                if match is None:
                    raise ConversionError(f"no mapping rule for Megatron parameter {name!r}")
                rule, local = match
                layer = None if local is None else chunk.decoder.layers[local].layer_number - 1
                names = list(mapping.hf_names(rule, layer, flavor))
                shard = mapping.to_mcore_shard(
                    rule,
                    [reader.get(n) for n in names],
                    flavor,
                    padded_vocab=padded_vocab,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                )
            if tuple(shard.shape) != tuple(param.shape):
                raise ConversionError(
                    f"shape mismatch for {name} (from {', '.join(names)}): got "
                    f"{tuple(shard.shape)}, model expects {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(shard.to(param.dtype))
            copied += 1
    return copied


# --------------------------------------------------------------------------- HF -> mcore


def _hf_to_mcore_worker(
    hf_dir: str, tmp_dir: str, flavor_dict: dict, parallel: ParallelConfig, dtype: str
) -> int:
    from megatron.core import parallel_state

    from qmath_megatron.reward_model.model import build_rm  # Megatron: in the workers only

    flavor = QwenFlavor.from_dict(flavor_dict)
    initialize(parallel)
    padded = padded_vocab_size(flavor.vocab_size, parallel.tp)
    chunks = build_rm(flavor, parallel, dtype, padded)
    copied = load_hf_into(
        chunks, hf_dir, flavor, padded, parallel_state.get_tensor_model_parallel_rank(), parallel.tp
    )
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
        head=SCORE_HEAD,
    )
    save_model(chunks, Path(tmp_dir) / "release", meta)
    return copied


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
    """HF ``Qwen2ForRewardModel`` directory -> Megatron checkpoint (``head: "score"``)."""
    return convert_hf_dir(
        hf_dir,
        out,
        validate_rm_dir,
        _hf_to_mcore_worker,
        tp=tp,
        pp=pp,
        vpp=vpp,
        dtype=dtype,
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------- mcore -> HF


def iter_hf_reward_tensors(
    chunk: Any, flavor: QwenFlavor, out_dtype: torch.dtype | None = None, *, free: bool = False
):
    """(HF name, tensor) of a full (TP=1, PP=1) reward model chunk, in the published order:
    backbone through the shared mapping, then the head. ``free`` releases each Megatron
    parameter once its HF tensors exist (export of large models)."""
    params = dict(chunk.named_parameters())
    for rule in backbone_rules():
        for layer in range(flavor.num_layers) if rule.per_layer else [None]:
            name = rule.mcore.format(i=layer)
            param = params.pop(name)
            hf = mapping.to_hf(rule, param.detach(), flavor)
            for hf_name, t in zip(mapping.hf_names(rule, layer, flavor), hf, strict=True):
                yield hf_name, (t.to(out_dtype) if out_dtype else t).clone()
            if free:
                param.data = torch.empty(0, dtype=param.dtype)
    for name in HEAD_TENSORS:
        t = params.pop(name).detach()
        yield name, (t.to(out_dtype) if out_dtype else t).clone()
    leftover = [n for n in params if not n.endswith("_extra_state")]
    if leftover:
        raise ConversionError(f"Megatron parameters with no HF mapping: {leftover}")


def _mcore_to_hf_worker(iter_dir: str, tmp_dir: str, dtype: str | None) -> int:
    from qmath_megatron.reward_model.model import build_rm  # Megatron: in the workers only

    _, meta = resolve_checkpoint(iter_dir)
    initialize(ParallelConfig())
    chunks = build_rm(meta.flavor, ParallelConfig(), meta.dtype, meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    out_dtype = PrecisionConfig(dtype=dtype).torch_dtype if dtype else None
    names = write_safetensors_shards(
        Path(tmp_dir), iter_hf_reward_tensors(chunks[0], meta.flavor, out_dtype, free=True)
    )
    return len(names)


def mcore_to_hf(
    ckpt: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Reward-model checkpoint (any TP/PP) -> HF directory in the published layout."""
    iter_dir, meta = resolve_checkpoint(ckpt)
    if meta.head != SCORE_HEAD:
        raise ConversionError(f"{ckpt} is not a reward-model checkpoint (head {meta.head!r})")
    torch_dtype = PrecisionConfig(dtype=dtype or meta.dtype).torch_dtype
    config = reward_model_hf_config(meta.flavor, torch_dtype)
    # config.json is the reward model's, not one a tokenizer directory may carry
    return export_hf_dir(
        iter_dir,
        out,
        _mcore_to_hf_worker,
        dtype=dtype,
        tokenizer=tokenizer,
        overwrite=overwrite,
        files={"config.json": config},
        tokenizer_skip=("config.json",),
    )


# --------------------------------------------------------------------------- verify


@dataclass
class RMVerifyResult:
    max_abs_diff: float  # of the scores
    mean_abs_diff: float
    sequences: int
    tokens: int
    tp: int
    pp: int
    scores: list[float] | None = None  # Megatron's scores, when asked for

    def passed(self, atol: float) -> bool:
        return self.max_abs_diff <= atol

    def report(self, atol: float) -> dict[str, Any]:
        return verify_report(self, atol, drop="scores", head=SCORE_HEAD)

    def summary(self, atol: float) -> str:
        return (
            f"reward model, TP={self.tp} PP={self.pp}: max |score diff| "
            f"{self.max_abs_diff:.3e} (mean {self.mean_abs_diff:.3e}) over {self.sequences} "
            f"sequences ({self.tokens} tokens) -> {'PASS' if self.passed(atol) else 'FAIL'} "
            f"(atol {atol:g})"
        )


def random_sequences(vocab: int, batch: int, seq: int, seed: int) -> list[list[int]]:
    """``batch`` random token sequences with random lengths in ``[seq // 2, seq]``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, seq // 2), seq + 1, (batch,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _verify_worker(
    hf_dir: str, iter_dir: str, parallel: ParallelConfig, batch: int, seq: int, seed: int
) -> dict | None:
    from megatron.core import parallel_state

    from qmath_megatron.reward_model.model import build_rm  # Megatron: in the workers only

    _, meta = resolve_checkpoint(iter_dir)
    initialize(parallel)
    chunks = build_rm(meta.flavor, parallel, meta.dtype, meta.padded_vocab_size)
    load_model(chunks, iter_dir, meta, current_spec="local")
    for chunk in chunks:
        chunk.float()
    sequences = random_sequences(meta.flavor.vocab_size, batch, seq, seed)
    ours = megatron_scores(chunks, sequences, micro_batch_size=max(1, batch // 2), pad_to=seq)
    if ours is None or parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    ref = Qwen2RewardModelReference.from_pretrained(hf_dir).score_ids(sequences, batch_size=batch)
    diff = (torch.tensor(ours, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "sequences": len(sequences),
        "tokens": sum(map(len, sequences)),
        "tp": parallel.tp,
        "pp": parallel.pp,
        "scores": ours,
    }


def verify(
    hf_dir: str | Path,
    ckpt: str | Path,
    *,
    tp: int | None = None,
    pp: int | None = None,
    vpp: int | None = None,
    batch: int = 4,
    seq: int = 64,
    seed: int = 0,
) -> RMVerifyResult:
    """Scores of the same random sequences from the HF reference and the Megatron reward
    model at TP x PP (default: as saved), fp32."""
    iter_dir, meta = resolve_checkpoint(ckpt)
    if meta.head != SCORE_HEAD:
        raise ConversionError(f"{ckpt} is not a reward-model checkpoint (head {meta.head!r})")
    hf_flavor, _ = validate_rm_dir(Path(hf_dir))
    result = run_verify(
        _verify_worker,
        hf_dir,
        hf_flavor,
        iter_dir,
        meta,
        tp=tp,
        pp=pp,
        vpp=vpp,
        args=(batch, seq, seed),
    )
    return RMVerifyResult(**result)

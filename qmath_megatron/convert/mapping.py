"""Declarative Hugging Face Qwen2 <-> Megatron-Core ``GPTModel`` tensor mapping.

Each :class:`TensorRule` names one Megatron parameter, the HF tensors it is made of and a
:class:`Layout` that says how they are combined and split across tensor-parallel ranks.
The converters only walk this table; there is no per-tensor code elsewhere.

Megatron layouts (per TP rank ``r`` of ``t``):

- ``linear_qkv``: one fused column-parallel weight, rows grouped per KV (query) group as
  ``[q heads of the group, k, v]``, split evenly into ``t`` row blocks: with ``g >= t``
  rank ``r`` holds groups ``r*g/t .. (r+1)*g/t``; with ``g < t`` (TP a multiple of the KV
  groups) each group's rows span ``t/g`` ranks, and Megatron-Core's attention all-gathers
  the QKV activations and keeps the group and query heads of its rank
  (``megatron/core/transformer/attention.py``, ``get_query_key_value_tensors``). No weight
  is replicated in either case, so checkpoints reshard between both regimes.
- ``linear_fc1``: SwiGLU ``[gate_r; up_r]``: each rank holds its slice of gate followed by
  its slice of up (not a slice of ``[gate; up]``).
- embeddings / output layer: rows padded with zeros to Megatron's padded vocab, then split.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qmath_megatron.models.flavors import QwenFlavor


class Layout(enum.Enum):
    REPLICATED = "replicated"  # same on every TP rank (RMSNorm weights)
    ROW = "row"  # row-parallel linear: split along input dim (1)
    VOCAB = "vocab"  # vocab-parallel: pad rows to padded vocab, split dim 0
    QKV = "qkv"  # q, k, v -> per-group interleave, split dim 0 (weights and biases)
    GATE_UP = "gate_up"  # gate, up -> [gate_r; up_r]


@dataclass(frozen=True)
class TensorRule:
    mcore: str  # local-spec name; "{i}" is the global layer index
    hf: tuple[str, ...]
    layout: Layout
    te_mcore: str | None = None  # name under the Transformer Engine layer spec, if different

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."
RULES: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Layout.VOCAB),
    TensorRule(
        _L + "input_layernorm.weight",
        (_H + "input_layernorm.weight",),
        Layout.REPLICATED,
        te_mcore=_L + "self_attention.linear_qkv.layer_norm_weight",
    ),
    TensorRule(
        _L + "self_attention.linear_qkv.weight",
        tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
        Layout.QKV,
    ),
    TensorRule(
        _L + "self_attention.linear_qkv.bias",
        tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
        Layout.QKV,
    ),
    TensorRule(
        _L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), Layout.ROW
    ),
    TensorRule(
        _L + "pre_mlp_layernorm.weight",
        (_H + "post_attention_layernorm.weight",),
        Layout.REPLICATED,
        te_mcore=_L + "mlp.linear_fc1.layer_norm_weight",
    ),
    TensorRule(
        _L + "mlp.linear_fc1.weight",
        (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        Layout.GATE_UP,
    ),
    TensorRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), Layout.ROW),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), Layout.REPLICATED),
    TensorRule("output_layer.weight", ("lm_head.weight",), Layout.VOCAB),
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_MCORE_PATTERNS = [
    (rule, _pattern(name)) for rule in RULES for name in (rule.mcore, rule.te_mcore) if name
]


def match_mcore(name: str) -> tuple[TensorRule, int | None] | None:
    """The rule for a Megatron parameter name (local layer index) and that index."""
    for rule, pattern in _MCORE_PATTERNS:
        m = pattern.match(name)
        if m:
            return rule, int(m.group(1)) if m.groups() else None
    return None


def hf_names(rule: TensorRule, layer: int | None, flavor: QwenFlavor) -> tuple[str, ...]:
    """HF tensor names feeding ``rule``; tied models read the output layer from the embedding."""
    if rule.mcore == "output_layer.weight" and flavor.tie_word_embeddings:
        return ("model.embed_tokens.weight",)
    return tuple(n.format(i=layer) for n in rule.hf)


def hf_tensor_names(flavor: QwenFlavor) -> list[str]:
    """Every tensor of the HF checkpoint, in the order the HF model defines them."""
    names: list[str] = []
    for rule in RULES:
        if rule.mcore == "output_layer.weight" and flavor.tie_word_embeddings:
            continue
        layers = range(flavor.num_layers) if rule.per_layer else [None]
        for layer in layers:
            names.extend(n.format(i=layer) for n in rule.hf)
    return names


# ------------------------------------------------------------------------ HF -> Megatron


def _qkv_interleave(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: QwenFlavor
) -> torch.Tensor:
    groups, d = f.num_query_groups, f.head_dim
    heads_per_group = f.num_attention_heads // groups
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    q = q.reshape(groups, heads_per_group * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_split(fused: torch.Tensor, f: QwenFlavor) -> list[torch.Tensor]:
    groups, d = f.num_query_groups, f.head_dim
    heads_per_group = f.num_attention_heads // groups
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, (heads_per_group + 2) * d, *rest)
    q, k, v = torch.split(per_group, [heads_per_group * d, d, d], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of shape {tuple(t.shape)} is not divisible by TP={size}")
    return torch.chunk(t, size, dim=dim)[rank]


def to_mcore_shard(
    rule: TensorRule,
    hf: Sequence[torch.Tensor],
    flavor: QwenFlavor,
    *,
    padded_vocab: int,
    tp_rank: int,
    tp_size: int,
) -> torch.Tensor:
    """The slice of ``rule``'s Megatron parameter held by TP rank ``tp_rank``."""
    layout = rule.layout
    if layout is Layout.REPLICATED:
        return hf[0]
    if layout is Layout.ROW:
        return _shard(hf[0], 1, tp_rank, tp_size)
    if layout is Layout.VOCAB:
        (w,) = hf
        if w.shape[0] > padded_vocab:
            raise ValueError(f"vocab of {w.shape[0]} rows exceeds padded vocab {padded_vocab}")
        padded = w.new_zeros((padded_vocab, *w.shape[1:]))
        padded[: w.shape[0]] = w
        return _shard(padded, 0, tp_rank, tp_size)
    if layout is Layout.QKV:
        return _shard(_qkv_interleave(*hf, flavor), 0, tp_rank, tp_size)
    if layout is Layout.GATE_UP:
        gate, up = hf
        return torch.cat([_shard(gate, 0, tp_rank, tp_size), _shard(up, 0, tp_rank, tp_size)])
    raise AssertionError(layout)


# ------------------------------------------------------------------------ Megatron -> HF


def full_shape(rule: TensorRule, shard_shape: Sequence[int], tp_size: int) -> tuple[int, ...]:
    """Shape of the full (TP=1) Megatron parameter whose TP shards have ``shard_shape``."""
    shape = list(shard_shape)
    if rule.layout is Layout.ROW:
        shape[1] *= tp_size
    elif rule.layout is not Layout.REPLICATED:
        shape[0] *= tp_size
    return tuple(shape)


def from_mcore_shards(rule: TensorRule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full (TP=1) Megatron parameter from its TP shards in rank order; inverse of
    :func:`to_mcore_shard` over all ranks (vocab padding kept; :func:`to_hf` trims it).

    With fewer KV groups than TP ranks Megatron still splits the fused, group-interleaved
    QKV rows evenly (a rank may hold part of a group; attention all-gathers the QKV
    activations), so the QKV inverse is a plain concatenation in that case too.
    """
    if len(shards) == 1 or rule.layout is Layout.REPLICATED:
        return shards[0]
    if rule.layout is Layout.ROW:
        return torch.cat(list(shards), dim=1)
    if rule.layout in (Layout.VOCAB, Layout.QKV):
        return torch.cat(list(shards), dim=0)
    if rule.layout is Layout.GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise AssertionError(rule.layout)


def to_hf(rule: TensorRule, full: torch.Tensor, flavor: QwenFlavor) -> list[torch.Tensor]:
    """HF tensors from a full (TP=1) Megatron parameter; inverse of :func:`to_mcore_shard`."""
    layout = rule.layout
    if layout in (Layout.REPLICATED, Layout.ROW):
        return [full]
    if layout is Layout.VOCAB:
        return [full[: flavor.vocab_size]]
    if layout is Layout.QKV:
        return _qkv_split(full, flavor)
    if layout is Layout.GATE_UP:
        return list(torch.chunk(full, 2, dim=0))
    raise AssertionError(layout)

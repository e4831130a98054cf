"""Stream Hugging Face-named full tensors out of a live Megatron model (any TP/PP/VPP).

The one Megatron -> HF code path: ``qmath convert mcore-to-hf`` writes what
:func:`iter_hf_tensors` yields, and RL weight sync sends what :func:`iter_hf_buckets`
yields, so an exported checkpoint and the weights an inference engine receives can never
disagree.

Both functions are collectives over the model-parallel group: every rank that holds part
of the model (all TP x PP ranks of one model replica; DP/CP replicas run their own copy
of the collective independently) calls them with its own chunks and iterates them to the
end. Every rank yields the same sequence of ``(hf_name, full tensor)`` in the same order:

- the owning pipeline stage all-gathers a parameter's TP shards over the TP group and
  rebuilds the full Megatron tensor (:func:`mapping.from_mcore_shards`),
- with PP > 1 the owning stage broadcasts it over the pipeline group (each TP rank to the
  PP ranks with its TP rank), so every stage gets it; virtual pipeline chunks are looked
  up by the global layer index they hold,
- it is un-fused into HF tensors (QKV, gate/up) and the vocab padding is trimmed by
  :func:`mapping.to_hf`, the same rules the import uses.

Fewer KV groups than TP ranks need nothing special: Megatron-Core keeps no replicated KV
weights in that case (the fused QKV rows are split evenly and the activations gathered, see
:mod:`mapping`), so the same gather rebuilds the full tensor.

Memory: a rank holds its own shards, the full tensor of the one parameter being exported
(transiently), and whatever the consumer keeps; :func:`iter_hf_buckets` keeps at most one
bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from qmath_megatron.convert import mapping
from qmath_megatron.convert.hf_io import ConversionError
from qmath_megatron.models.builder import unwrap
from qmath_megatron.models.flavors import QwenFlavor

Key = tuple[str, int | None]  # (rule's Megatron name template, global layer index)

EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"


def export_order(flavor: QwenFlavor) -> list[tuple[mapping.TensorRule, int | None]]:
    """(rule, global layer) in the order the HF model defines its tensors."""
    by_name = {rule.mcore: rule for rule in mapping.RULES}
    layer_rules = [rule for rule in mapping.RULES if rule.per_layer]
    order: list[tuple[mapping.TensorRule, int | None]] = [(by_name[EMBEDDING], None)]
    for layer in range(flavor.num_layers):
        order.extend((rule, layer) for rule in layer_rules)
    order.append((by_name["decoder.final_layernorm.weight"], None))
    if not flavor.tie_word_embeddings:
        order.append((by_name[OUTPUT_LAYER], None))
    return order


def _local_parameters(chunks: Sequence[Any], flavor: QwenFlavor) -> dict[Key, torch.nn.Parameter]:
    """This rank's parameters keyed by (rule, global layer); refuses unmapped parameters."""
    local: dict[Key, torch.nn.Parameter] = {}
    for chunk in map(unwrap, chunks):
        for name, param in chunk.named_parameters():
            match = mapping.match_mcore(name)
            if match is None:
                raise ConversionError(f"no HF mapping for Megatron parameter {name!r}")
            rule, local_index = match
            if rule.mcore == OUTPUT_LAYER and flavor.tie_word_embeddings:
                # The last stage's copy of a tied embedding (PP > 1): the embedding is
                # exported from the first stage.
                continue
            layer = None
            if local_index is not None:
                layer = chunk.decoder.layers[local_index].layer_number - 1
            local[rule.mcore, layer] = param
    return local


def iter_hf_tensors(
    chunks: Sequence[Any],
    flavor: QwenFlavor,
    padded_vocab: int,
    *,
    include_lm_head: bool = False,
    dtype: torch.dtype | None = None,
    release: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the whole model; a collective (module docstring).

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage), bare
            ``GPTModel`` or wrapped in Megatron DDP / ``Float16Module``.
        flavor: the architecture (names, head layout, unpadded vocab).
        padded_vocab: the model's (TP-padded) vocab size; checked against the embedding.
        include_lm_head: also yield ``lm_head.weight`` for tied models (right after
            ``model.embed_tokens.weight``, the same tensor object). Untied models always
            yield it (last).
        dtype: cast to this dtype (before the gather, so fewer bytes move); ``None`` keeps
            the parameters' dtype.
        release: free each local parameter's storage once its tensors are yielded, for a
            one-shot export of a model that is discarded afterwards (peak memory: one
            model, not two). The model is unusable afterwards.

    Tensors live on the parameters' device, may share storage with the model's parameters
    (do not modify them in place) and are only valid until the model is next updated.
    Every rank yields the same names in the same order (HF model order).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()

    local = _local_parameters(chunks, flavor)
    if not local:
        raise ConversionError("this rank holds no model parameters to export")
    device = next(iter(local.values())).device
    held = {key: (tuple(p.shape), p.dtype) for key, p in local.items()}
    # Who owns what: one small object exchange, so uneven and interleaved (VPP) layer
    # placements need no assumptions about Megatron's layer offsets.
    if pp_size > 1:
        per_stage: list[dict] = [{} for _ in range(pp_size)]
        dist.all_gather_object(per_stage, held, group=pp_group)
        pp_ranks = dist.get_process_group_ranks(pp_group)
    else:
        per_stage, pp_ranks = [held], [dist.get_rank()]
    owners: dict[Key, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for stage, stage_held in enumerate(per_stage):
        for key, (shape, param_dtype) in stage_held.items():
            owners.setdefault(key, (stage, shape, param_dtype))

    order = export_order(flavor)
    missing = [f"{r.mcore.format(i=layer)}" for r, layer in order if (r.mcore, layer) not in owners]
    if missing:
        raise ConversionError(
            f"the model chunks lack {len(missing)} parameter(s) of {flavor.name}, e.g. "
            f"{missing[0]}; is this the model of that flavor?"
        )

    for rule, layer in order:
        key = (rule.mcore, layer)
        owner, shard_shape, param_dtype = owners[key]
        out_dtype = dtype or param_dtype
        if owner == pp_rank:
            param = local[key]
            shard = param.detach()
            if shard.dtype != out_dtype:
                shard = shard.to(out_dtype)
            if tp_size > 1 and rule.layout is not mapping.Layout.REPLICATED:
                shard = shard.contiguous()
                shards = [torch.empty_like(shard) for _ in range(tp_size)]
                dist.all_gather(shards, shard, group=tp_group)
            else:
                shards = [shard]
            full = mapping.from_mcore_shards(rule, shards)
            del shards, shard
            if release:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        else:
            shape = mapping.full_shape(rule, shard_shape, tp_size)
            full = torch.empty(shape, dtype=out_dtype, device=device)
        if pp_size > 1:
            full = full.contiguous()
            dist.broadcast(full, src=pp_ranks[owner], group=pp_group)
        if rule.layout is mapping.Layout.VOCAB and full.shape[0] != padded_vocab:
            raise ConversionError(
                f"{rule.mcore} has {full.shape[0]} rows but padded_vocab is {padded_vocab}"
            )
        hf = mapping.to_hf(rule, full, flavor)
        del full
        for name, tensor in zip(mapping.hf_names(rule, layer, flavor), hf, strict=True):
            yield name, tensor
            if include_lm_head and flavor.tie_word_embeddings and rule.mcore == EMBEDDING:
                yield "lm_head.weight", tensor
        del hf


def iter_hf_buckets(
    chunks: Sequence[Any],
    flavor: QwenFlavor,
    padded_vocab: int,
    *,
    include_lm_head: bool = False,
    dtype: torch.dtype | None = None,
    bucket_bytes: int = 1 << 30,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """:func:`iter_hf_tensors` grouped by :func:`bucket_tensors` into lists of at most
    ``bucket_bytes`` bytes (a larger tensor is a bucket of its own).

    A collective like :func:`iter_hf_tensors` (every rank yields the same buckets).
    The tied ``lm_head.weight`` counts its bytes again (it is sent again).
    """
    tensors = iter_hf_tensors(
        chunks, flavor, padded_vocab, include_lm_head=include_lm_head, dtype=dtype
    )
    yield from bucket_tensors(tensors, bucket_bytes)


def bucket_tensors(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``bucket_bytes`` bytes, in
    order; a tensor larger than ``bucket_bytes`` is a bucket of its own. Lazy: holds one
    bucket. (What weight sync sends per bucket; a writer of size-capped files can use it.)"""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket

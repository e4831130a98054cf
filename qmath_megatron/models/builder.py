"""The one place where a Qwen2.5 flavor becomes a Megatron-Core model.

flavor + :class:`ParallelConfig` + :class:`PrecisionConfig` ->
``TransformerConfig`` -> layer spec (Transformer Engine on GPU, local otherwise) ->
``GPTModel`` (one chunk per virtual pipeline stage).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import torch
import torch.nn.functional as F

from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig
from qmath_megatron.models.flavors import QwenFlavor

logger = logging.getLogger(__name__)

# Megatron pads the embedding to a multiple of this x TP so each TP shard is GEMM-friendly.
VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Vocab size padded as Megatron-LM does: up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def transformer_engine_available() -> bool:
    """TE kernels are used when TE is importable and a GPU is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def layer_spec() -> str:
    """The layer spec models are built with here: ``"te"`` or ``"local"`` (what a
    checkpoint's ``ModelMeta.layer_spec`` records, and what a load remaps from)."""
    return "te" if transformer_engine_available() else "local"


def precision_kwargs(precision: PrecisionConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields for a precision setting (FP8 settings reach TE verbatim)."""
    dtype = precision.torch_dtype
    kwargs: dict[str, Any] = {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": precision.dtype == "bf16",
        "fp16": precision.dtype == "fp16",
    }
    if precision.fp8 is not None:
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_margin=precision.fp8_margin,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            fp8_wgrad=precision.fp8_wgrad,
            fp8_param=precision.fp8_param,
            first_last_layers_bf16=precision.first_last_layers_bf16,
            num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
            num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16,
        )
    return kwargs


def check_fp8_recipe_supported(recipe: str) -> None:
    """Fail early, with TE's own reason, when this GPU/TE cannot run an FP8 recipe."""
    from transformer_engine.pytorch import fp8 as te_fp8

    checks = {
        "delayed": "check_fp8_support",
        "tensorwise": "check_fp8_support",
        "blockwise": "check_fp8_block_scaling_support",
        "mxfp8": "check_mxfp8_support",
    }
    check = getattr(te_fp8, checks[recipe], None)
    if check is None:
        raise RuntimeError(f"the installed Transformer Engine has no FP8 recipe {recipe!r}")
    ok, reason = check()
    if not ok:
        raise RuntimeError(f"FP8 recipe {recipe!r} is not supported here: {reason}")


def check_parallel_fits(flavor: QwenFlavor, parallel: ParallelConfig) -> None:
    """Clear errors for layouts Megatron would reject with an assertion deep inside."""
    tp, pp = parallel.tp, parallel.pp
    if flavor.num_attention_heads % tp:
        raise ValueError(
            f"TP={tp} does not divide the {flavor.num_attention_heads} attention heads of "
            f"{flavor.name}"
        )
    groups = flavor.num_query_groups
    # Megatron-Core shards KV groups when TP divides them and, when TP is a multiple of
    # them, splits the fused [q..., k, v] rows evenly and all-gathers the QKV activations
    # so each rank attends with its KV group (transformer/attention.py); other ratios are
    # rejected by TransformerConfig.
    if groups % tp and tp % groups:
        raise ValueError(
            f"TP={tp} does not divide the {groups} KV groups (query groups) of {flavor.name} "
            f"and is not a multiple of them: Megatron needs one or the other"
        )
    qkv_rows = (flavor.num_attention_heads + 2 * groups) * flavor.head_dim
    if qkv_rows % tp:
        raise ValueError(f"TP={tp} does not divide the {qkv_rows} fused QKV rows of {flavor.name}")
    if flavor.ffn_hidden_size % tp:
        raise ValueError(f"TP={tp} does not divide ffn_hidden_size {flavor.ffn_hidden_size}")
    stages = pp * (parallel.vpp or 1)
    if flavor.num_layers % stages:
        raise ValueError(
            f"{flavor.num_layers} layers of {flavor.name} cannot be split evenly into "
            f"PP={pp} x VPP={parallel.vpp or 1} = {stages} pipeline stages"
        )


def build_transformer_config(
    flavor: QwenFlavor,
    parallel: ParallelConfig,
    precision: PrecisionConfig,
    *,
    use_cpu_initialization: bool | None = None,
    perform_initialization: bool = True,
    init_method_std: float = 0.02,
    **overrides: Any,
):
    """The Qwen2 architecture as a Megatron ``TransformerConfig``.

    ``overrides`` are extra ``TransformerConfig`` fields (recompute, overlap, ...), applied
    last. Fusions that need CUDA kernels are enabled only on GPU.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_parallel_fits(flavor, parallel)
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=flavor.num_layers,
        hidden_size=flavor.hidden_size,
        ffn_hidden_size=flavor.ffn_hidden_size,
        num_attention_heads=flavor.num_attention_heads,
        num_query_groups=flavor.num_query_groups,
        kv_channels=flavor.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=flavor.rms_norm_eps,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=init_method_std,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=(not on_gpu)
        if use_cpu_initialization is None
        else use_cpu_initialization,
        perform_initialization=perform_initialization,
        # CUDA-only fused kernels; Megatron falls back to unfused code when they are off.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=on_gpu,
        **precision_kwargs(precision),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_layer_spec(use_te: bool | None = None):
    """Transformer Engine layer spec when TE and a GPU are present, local spec otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def unwrap(module: Any) -> Any:
    """The ``GPTModel`` inside DDP / ``Float16Module`` wrappers (they all use ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def build_model(
    flavor: QwenFlavor,
    config,
    *,
    padded_vocab: int | None = None,
    use_te: bool | None = None,
    max_sequence_length: int | None = None,
    rotary_base: float | None = None,
    model_class: type | None = None,
) -> list:
    """Build this rank's model chunks (one per virtual pipeline stage) of a ``GPTModel``.

    Needs Megatron's parallel state to be initialised (:mod:`qmath_megatron.parallel.runtime`).
    ``model_class``: a ``GPTModel`` subclass taking the same arguments (the reward model's
    :class:`qmath_megatron.reward_model.model.RewardGPTModel`); default ``GPTModel``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = transformer_engine_available()
    if config.fp8 and not use_te:
        raise RuntimeError(
            "precision.fp8 is set but Transformer Engine with a GPU is not available; "
            "install the `gpu` extra on a CUDA machine or unset precision.fp8"
        )
    if config.fp8:
        check_fp8_recipe_supported(config.fp8_recipe)
    if config.sequence_parallel and not use_te and importlib.util.find_spec("apex") is None:
        raise RuntimeError(
            "sequence parallelism needs Transformer Engine (or apex) norms; megatron's torch "
            "RMSNorm fallback does not support it: unset parallel.sequence_parallel on CPU"
        )
    if config.context_parallel_size > 1 and not use_te:
        raise RuntimeError("context parallelism needs Transformer Engine attention (GPU)")

    tp = config.tensor_model_parallel_size
    vocab = padded_vocab or padded_vocab_size(flavor.vocab_size, tp)
    if vocab % tp or vocab < flavor.vocab_size:
        raise ValueError(
            f"padded vocab {vocab} must be >= {flavor.vocab_size} and divisible by TP={tp}"
        )
    spec = build_layer_spec(use_te)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = (model_class or GPTModel)(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=max_sequence_length or flavor.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=flavor.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(rotary_base or flavor.rope_theta),
            parallel_output=True,
            vp_stage=stage,
        )
        chunks.append(model)
    return chunks

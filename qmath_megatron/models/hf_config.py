"""The Hugging Face ``config.json`` of a flavor: what the random reference models, the
conversion's export and the reward model's export write (the reverse, reading a config
into a flavor, is the conversion's: :func:`qmath_megatron.convert.hf_io.flavor_from_hf_config`)."""

from __future__ import annotations

from typing import Any

import torch

from qmath_megatron.models.flavors import QwenFlavor

# config.json's name of each torch dtype (``torch_dtype`` in transformers 4.x, ``dtype`` in 5.x).
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_from_flavor(flavor: QwenFlavor, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that transformers 4.x and 5.x both load as ``Qwen2ForCausalLM``."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": flavor.hidden_size,
        "intermediate_size": flavor.ffn_hidden_size,
        "num_hidden_layers": flavor.num_layers,
        "num_attention_heads": flavor.num_attention_heads,
        "num_key_value_heads": flavor.num_query_groups,
        "vocab_size": flavor.vocab_size,
        "max_position_embeddings": flavor.max_position_embeddings,
        "rms_norm_eps": flavor.rms_norm_eps,
        "rope_theta": flavor.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": flavor.rope_theta},
        "tie_word_embeddings": flavor.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": flavor.num_layers,
        # Qwen's <|endoftext|>; left out for tiny test vocabularies that do not contain it.
        "bos_token_id": 151643 if flavor.vocab_size > 151643 else None,
        "eos_token_id": 151643 if flavor.vocab_size > 151643 else None,
        "torch_dtype": HF_DTYPE_NAMES[dtype],
        "dtype": HF_DTYPE_NAMES[dtype],
    }

"""Random Hugging Face Qwen2 models of a given flavor: the reference for parity tests,
the demo and the conversion benchmark (no hub download needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from qmath_megatron.models.flavors import QwenFlavor
from qmath_megatron.models.hf_config import hf_config_from_flavor


def make_random_hf_model(
    flavor: QwenFlavor, out_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Save a randomly initialised ``Qwen2ForCausalLM`` of ``flavor`` to ``out_dir``.

    Norm weights and biases are randomised too (HF initialises them to ones/zeros), so a
    mapping that swapped or dropped them would change the logits.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    fields = hf_config_from_flavor(flavor, dtype)
    fields.pop("architectures"), fields.pop("model_type"), fields.pop("rope_parameters")
    fields.pop("torch_dtype"), fields.pop("dtype")
    config = Qwen2Config(**fields)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir

"""Tiny random Hugging Face models the tests build on the spot (no hub): a reward model in
the published Qwen2ForRewardModel layout, and the tokenizer files copied beside a model."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_tokenizer_files(tokenizer_dir: Path, model_dir: Path) -> None:
    """The tokenizer and chat template of ``tokenizer_dir`` (a model directory with them),
    not its weights or configs, into ``model_dir``."""
    for f in tokenizer_dir.iterdir():
        if f.is_file() and not f.name.startswith(("config", "generation_config", "model")):
            shutil.copy2(f, model_dir / f.name)


def make_tiny_hf_rm(
    out: Path, tokenizer_dir: Path, *, seed: int, max_positions: int = 512, layers: int = 1
) -> Path:
    """A random tiny reward model with the Qwen vocabulary (hidden 64, 2 heads) and the
    real tokenizer copied in."""
    from qmath_megatron.models.flavors import QwenFlavor
    from qmath_megatron.reward_model.hf import make_random_hf_reward_model

    flavor = QwenFlavor(
        name=f"tiny-rm-{layers}l-{max_positions}",
        num_layers=layers,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=2,
        num_query_groups=2,
        vocab_size=151936,
        rope_theta=1e6,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    hf = make_random_hf_reward_model(flavor, out, seed=seed)
    copy_tokenizer_files(tokenizer_dir, hf)
    return hf

"""Shared fixtures: tiny random Hugging Face Qwen2 models built on the spot (no hub)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

# Megatron/TE import-time chatter is noise in test output; real warnings still show.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """{"tiny-tied": dir, "tiny-untied": dir}: fp32 HF checkpoints with random weights."""
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model

    root = tmp_path_factory.mktemp("hf")
    return {
        name: make_random_hf_model(get_flavor(name), root / name, seed=i)
        for i, name in enumerate(["tiny-tied", "tiny-untied"])
    }


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED

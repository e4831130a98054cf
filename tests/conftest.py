"""Shared fixtures: tiny random Hugging Face Qwen2 models built on the spot (no hub)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

# Megatron/TE import-time chatter is noise in test output; real warnings still show.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# Test speed, not behaviour: torch's CPU allocator backs large tensors (the tiny models'
# [batch, seq, 151k-vocab] logits) with transparent huge pages, so the spawned ranks and
# subprocesses that inherit this take ~10x fewer page faults (a third of the suite's CPU
# time went to the kernel zeroing 4 KiB pages). Read by c10 at a process's first allocation.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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


@pytest.fixture(scope="session")
def tiny_instruct(tmp_path_factory) -> Path:
    """A random tiny Qwen2 with the real Qwen2.5 tokenizer and chat template in one directory."""
    import shutil

    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model
    from qmath_megatron.tokenizer.qwen import build_qwen25_tokenizer

    root = tmp_path_factory.mktemp("tiny_instruct")
    model = make_random_hf_model(get_flavor("tiny-qwen-vocab"), root / "model", seed=0)
    tok = build_qwen25_tokenizer(root / "tok")
    for f in tok.iterdir():
        shutil.copy2(f, model / f.name)
    return model

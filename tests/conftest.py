"""Shared fixtures: tiny random Hugging Face Qwen2 models built on the spot (no hub), and
the shared benchmark files (``../shared/benchmarks``), which a fresh clone may not have."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
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

# The folder beside the repository that holds the public benchmark files; not part of the
# repository, so a fresh clone runs without it. QMATH_SHARED_DIR points elsewhere (a folder
# that does not exist reproduces a bare clone).
SHARED = Path(
    os.environ.get("QMATH_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared"
)


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
def shared_benchmark() -> Callable[[str], Path]:
    """``shared_benchmark("math500")`` -> ``SHARED/benchmarks/math500/test.jsonl``; when the
    file is absent it skips the calling test with a one-line reason (only tests that need
    the real benchmark text use this; every other test makes its own data)."""

    def find(name: str) -> Path:
        path = SHARED / "benchmarks" / name / "test.jsonl"
        if not path.is_file():
            pytest.skip(f"needs the shared {name} benchmark: {path} not found")
        return path

    return find


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

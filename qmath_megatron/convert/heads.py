"""Model heads other than the LM head that ``qmath convert`` converts: a registry.

A checkpoint's ``qmath_model.json`` names its head (``ModelMeta.head``): ``"lm"`` is the
language model (``GPTModel`` with its LM head), which this package converts itself. A
stage package whose model has another head registers a :class:`HeadConverter` for it
(the reward model's ``"score"``, registered by :mod:`qmath_megatron.reward_model` when it
is imported); ``hf_to_mcore``, ``mcore_to_hf`` and ``verify`` of
:mod:`qmath_megatron.convert.commands` dispatch through the registry, so conversion never
imports the packages above it.

A registration is plain data (this module imports neither torch nor the head's code): the
``qmath`` command registers every head while it builds its parser, and the head's
implementation is imported only when a conversion of that head runs.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

LM_HEAD = "lm"


@dataclass(frozen=True)
class HeadConverter:
    """How to convert the models of one head."""

    head: str  # ModelMeta.head of its Megatron checkpoints
    hf_architecture: str  # `architectures[0]` of its HF config.json
    # The module defining its `hf_to_mcore`, `mcore_to_hf` and `verify`, with the arguments
    # of their convert.commands namesakes (`verify` without `return_logits`); `verify`'s
    # result has `passed(atol)`, `report(atol)` (the JSON report) and `summary(atol)`.
    module: str

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)


_HEADS: dict[str, HeadConverter] = {}


def register_head(converter: HeadConverter) -> None:
    """Add ``converter`` to the registry (again is a no-op; another converter for a head
    that has one is a ValueError)."""
    if converter.head == LM_HEAD:
        raise ValueError(f"head {LM_HEAD!r} is the language model, converted by convert/ itself")
    existing = _HEADS.get(converter.head)
    if existing is not None and existing != converter:
        raise ValueError(f"a converter for head {converter.head!r} is already registered")
    _HEADS[converter.head] = converter


def registered_heads() -> list[str]:
    return sorted(_HEADS)


def find_head(head: str) -> HeadConverter | None:
    """The converter registered for ``head`` (None for an unknown one)."""
    return _HEADS.get(head)


def hf_dir_head(hf_dir: str | Path) -> HeadConverter | None:
    """The converter whose architecture the ``config.json`` of ``hf_dir`` names; None for
    every other directory (which is then read as a ``Qwen2ForCausalLM``)."""
    try:
        config = json.loads((Path(hf_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    for converter in _HEADS.values():
        if archs and archs[0] == converter.hf_architecture:
            return converter
    return None

"""Megatron ``torch_dist`` model checkpoints that describe themselves.

Directory layout (Megatron-LM's, so its tools can read ours)::

    CKPT/
      latest_checkpointed_iteration.txt     # "release" (converted) or an iteration number
      release/  or  iter_0000100/
        .metadata, __0_0.distcp, ...         # megatron dist_checkpointing (torch_dist)
        qmath_model.json                     # flavor, padded vocab, dtype, layer spec, layout

The model state lives under ``"model"`` (``"model0"``, ``"model1"``, ... with virtual
pipeline stages) exactly as Megatron-LM stores it; sharded tensors carry global keys, so
a checkpoint saved at one TP/PP/VPP loads at another.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qmath_megatron.models.flavors import QwenFlavor

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MODEL_META_FILE = "qmath_model.json"
FORMAT_VERSION = 1

# Norm weights live in different modules under the two layer specs (the TE spec fuses the
# norm into the following linear); everything else has the same sharded key.
_LOCAL_TO_TE_KEYS = {
    "decoder.layers.input_layernorm.weight": (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    ),
    "decoder.layers.pre_mlp_layernorm.weight": "decoder.layers.mlp.linear_fc1.layer_norm_weight",
}
_TE_TO_LOCAL_KEYS = {v: k for k, v in _LOCAL_TO_TE_KEYS.items()}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or not ours."""


class IncompleteCheckpointError(ValueError):
    """A qmath checkpoint whose torch_dist files are missing or cut short.

    Deliberately not a :class:`CheckpointError`: callers that catch that to mean "this is
    not a Megatron checkpoint, try something else" (``qmath eval --model``) must not hide
    a damaged checkpoint behind a wrong message.
    """


@dataclass
class ModelMeta:
    flavor: QwenFlavor
    padded_vocab_size: int
    dtype: str  # "fp32" | "bf16" | "fp16"
    layer_spec: str  # "local" | "te"
    tp: int
    pp: int
    vpp: int | None = None
    iteration: int | str = "release"
    source: str | None = None
    # "lm": GPTModel with its LM head; "score": the reward model (GPTModel backbone + score
    # head, qmath_megatron.reward_model). Older files without the field are "lm".
    head: str = "lm"

    def to_json(self) -> str:
        data = asdict(self)
        data["flavor"] = self.flavor.to_dict()
        data["format_version"] = FORMAT_VERSION
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        data = json.loads(text)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise CheckpointError(f"unsupported {MODEL_META_FILE} format_version {version!r}")
        data["flavor"] = QwenFlavor.from_dict(data["flavor"])
        return cls(**data)


def iteration_dirname(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def resolve_checkpoint(path: str | Path) -> tuple[Path, ModelMeta]:
    """An iteration directory and its metadata from a checkpoint root or iteration dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MODEL_META_FILE).is_file():
        iter_dir = path
    elif (path / TRACKER_FILE).is_file():
        tag = (path / TRACKER_FILE).read_text().strip()
        iter_dir = path / iteration_dirname(tag if tag == "release" else int(tag))
        if not (iter_dir / MODEL_META_FILE).is_file():
            raise CheckpointError(
                f"{path / TRACKER_FILE} points at {iter_dir.name}, which is missing or incomplete"
            )
    else:
        raise CheckpointError(
            f"{path} is not a qmath Megatron checkpoint (no {TRACKER_FILE} or {MODEL_META_FILE})"
        )
    check_checkpoint_files(iter_dir)
    return iter_dir, ModelMeta.from_json((iter_dir / MODEL_META_FILE).read_text())


# Files every torch_dist checkpoint directory has besides its .distcp shards: Megatron's
# backend description, the non-sharded ("common") state and torch DCP's metadata.
REQUIRED_CHECKPOINT_FILES = ("metadata.json", "common.pt", ".metadata")


def check_checkpoint_files(iter_dir: str | Path) -> None:
    """Refuse an incomplete torch_dist directory up front, naming the file.

    Without this, a missing ``common.pt`` or ``__R_S.distcp`` (a failed copy, a pruned
    shard) surfaces inside every rank's ``dist_checkpointing.load`` as an unrelated
    exception. Every shard file that DCP's ``.metadata`` references must exist and be
    long enough for the byte ranges read from it. Cached per ``.metadata`` version, so
    repeated calls (every rank, every resolve) cost one stat.
    """
    iter_dir = Path(iter_dir)
    for name in REQUIRED_CHECKPOINT_FILES:
        if not (iter_dir / name).is_file():
            raise IncompleteCheckpointError(f"incomplete checkpoint: {iter_dir / name} is missing")
    stat = (iter_dir / ".metadata").stat()
    _check_shard_files(str(iter_dir), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _check_shard_files(iter_dir: str, mtime_ns: int, size: int) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(iter_dir).read_metadata()
    except Exception as exc:
        raise IncompleteCheckpointError(
            f"unreadable checkpoint metadata {Path(iter_dir) / '.metadata'}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for relative, end in sorted(needed.items()):
        file = Path(iter_dir) / relative
        if not file.is_file():
            raise IncompleteCheckpointError(f"incomplete checkpoint: shard file {file} is missing")
        actual = file.stat().st_size
        if actual < end:
            raise IncompleteCheckpointError(
                f"truncated checkpoint shard {file}: {actual} bytes, the metadata needs {end}"
            )


def model_sharded_state_dict(chunks: list) -> dict[str, Any]:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def remap_spec_keys(sharded: dict[str, Any], saved_spec: str, current_spec: str) -> None:
    """Point this model's sharded keys (``model_sharded_state_dict``, changed in place) at
    the names a checkpoint saved with layer spec ``saved_spec`` uses, for a model built with
    ``current_spec`` ("local" or "te"). For loads other than :func:`load_model`'s (e.g. a
    reward model's backbone from a language-model checkpoint)."""
    if saved_spec == current_spec:
        return
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    mapping = _TE_TO_LOCAL_KEYS if current_spec == "te" else _LOCAL_TO_TE_KEYS
    for chunk_sd in sharded.values():
        for name in list(chunk_sd):
            value = chunk_sd[name]
            key = getattr(value, "key", None)
            if key in mapping:
                value.key = mapping[key]
            elif isinstance(value, ShardedObject) and current_spec == "te":
                # TE's FP8 "_extra_state" does not exist in a local-spec checkpoint; TE
                # re-initialises it (amax history starts empty, as after any conversion).
                del chunk_sd[name]


def save_model(chunks: list, iter_dir: str | Path, meta: ModelMeta) -> None:
    """Collective: every rank saves its shards into ``iter_dir``; rank 0 writes metadata last.

    The metadata file is what marks the directory as complete (see :func:`resolve_checkpoint`).
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    iter_dir = Path(iter_dir)
    if dist.get_rank() == 0:
        iter_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(iter_dir))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = iter_dir / (MODEL_META_FILE + ".tmp")
        tmp.write_text(meta.to_json())
        os.replace(tmp, iter_dir / MODEL_META_FILE)
    dist.barrier()


def exception_causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it: ``__cause__``/``__context__`` and the per-rank
    ``failures`` torch DCP gathers into its ``CheckpointException``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(inner, BaseException):
                    todo.append(inner)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


# What megatron / torch DCP say when the model built from the metadata is not the one saved.
_MISMATCH_MARKERS = ("shape mismatch", "Missing key")


def load_model(chunks: list, iter_dir: str | Path, meta: ModelMeta, current_spec: str) -> None:
    """Collective: load a checkpoint saved at any TP/PP/VPP into this rank's model chunks."""
    from megatron.core import dist_checkpointing

    check_checkpoint_files(iter_dir)
    sharded = model_sharded_state_dict(chunks)
    remap_spec_keys(sharded, meta.layer_spec, current_spec)
    try:
        state = dist_checkpointing.load(sharded, str(iter_dir))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        mismatch = next(
            (
                str(e).splitlines()[0]
                for e in exception_causes(exc)
                if any(m in str(e) for m in _MISMATCH_MARKERS)
                and not type(e).__name__.endswith("CheckpointException")
            ),
            None,
        )
        if mismatch is None:
            raise
        # The model is built from the metadata, so the shards disagree with it.
        raise CheckpointError(
            f"{Path(iter_dir)}: its shards do not match {MODEL_META_FILE}: {mismatch}"
        ) from exc
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys, strict=True):
        chunk.load_state_dict(state[key], strict=current_spec == meta.layer_spec)


def write_tracker(root: str | Path, iteration: int | str) -> None:
    """Atomically point ``root`` at an iteration (``latest_checkpointed_iteration.txt``)."""
    root = Path(root)
    tmp = root / (TRACKER_FILE + ".tmp")
    tmp.write_text(f"{iteration}\n")
    os.replace(tmp, root / TRACKER_FILE)


def publish_directory(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir`` so readers never see a partial one."""
    if final_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{final_dir} exists; pass --overwrite to replace it")
        trash = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)

"""Imported inside the worker processes of every :class:`~qmath_megatron.inference.engine.
VLLMEngine`, whatever its weight transfer (``LLM(worker_extension_cls=EXTENSION)``, which vLLM
resolves in each worker, in-process or not): registers the ``qmath_shm`` weight-transfer
backend there, adds a test aid to the workers and drops vLLM's reload warning about rotary
embeddings (:func:`quiet_rotary_reload_warning`)."""

from __future__ import annotations

import logging

from qmath_megatron.inference.weight_transfer import QmathWorkerExtension, register_shm_backend

# Every VLLMEngine's worker_extension_cls (inference/engine.py WORKER_EXTENSION: the same).
EXTENSION = "qmath_megatron.inference.vllm_worker.QmathWorkerExtension"
# The logger of vLLM 0.32's layerwise reload (vllm/model_executor/model_loader/reload/
# layerwise.py), which every in-place weight update goes through.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class RotaryReloadFilter(logging.Filter):
    """Drops "<layer>: Failed to load weights" for rotary embeddings only.

    finalize_layerwise_processing warns for each layer that loaded nothing, then puts the
    layer's own tensors back. A rotary embedding never loads anything: its one tensor is
    the cos/sin cache, a non-persistent buffer computed from the config that no checkpoint
    holds (Qwen2's load_weights skips rotary names). So the warning came on every GRPO
    step while the engine kept the right cache; another layer's warning is kept (a weight
    the sender really left out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == "%s: Failed to load weights"
            and len(args) == 1
            and str(args[0]).endswith("RotaryEmbedding")
        )


def quiet_rotary_reload_warning() -> None:
    """Install :class:`RotaryReloadFilter` on vLLM's reload logger (once per process)."""
    logger = logging.getLogger(RELOAD_LOGGER)
    if not any(isinstance(f, RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(RotaryReloadFilter())


register_shm_backend()
quiet_rotary_reload_warning()

__all__ = ["EXTENSION", "QmathWorkerExtension", "quiet_rotary_reload_warning"]

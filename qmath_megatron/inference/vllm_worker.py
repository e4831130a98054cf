"""Imported inside vLLM worker processes (``LLM(worker_extension_cls=EXTENSION)``): registers
the ``qmath_shm`` weight-transfer backend there and adds a test aid to the workers."""

from __future__ import annotations

from qmath_megatron.inference.weight_transfer import QmathWorkerExtension, register_shm_backend

EXTENSION = "qmath_megatron.inference.vllm_worker.QmathWorkerExtension"

register_shm_backend()

__all__ = ["EXTENSION", "QmathWorkerExtension"]

"""Every vLLM engine of VLLMEngine carries the qmath worker extension, whatever its weight
transfer: vLLM imports the extension's module in each worker, which drops the per-step
"RotaryEmbedding: Failed to load weights" warning there (not only for qmath_shm engines).
Built against a stand-in ``vllm`` (no engine starts)."""

from __future__ import annotations

import importlib
import logging
import sys
import types
from types import SimpleNamespace

import pytest

from qmath_megatron.inference.engine import WORKER_EXTENSION, VLLMEngine


class RecordingLLM:
    instances: list[RecordingLLM] = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs
        RecordingLLM.instances.append(self)

    def init_weight_transfer_engine(self, request):  # qmath_shm engines initialise it
        self.init = request


@pytest.fixture
def fake_vllm(monkeypatch):
    pytest.importorskip("vllm")
    # The real worker module first (it registers qmath_shm with the real vLLM), then the
    # stand-in: VLLMEngine's own import of it is then a no-op.
    importlib.import_module("qmath_megatron.inference.vllm_worker")
    import vllm.envs  # the real one: _engine_core_in_another_process reads it

    module = types.ModuleType("vllm")
    module.LLM = RecordingLLM
    module.envs = vllm.envs
    config = types.ModuleType("vllm.config")
    config.WeightTransferConfig = lambda backend: SimpleNamespace(backend=backend)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.config", config)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    RecordingLLM.instances.clear()
    return module


@pytest.mark.parametrize("backend", [None, "qmath_shm", "ipc", "nccl"])
def test_every_engine_backend_carries_the_worker_extension(fake_vllm, backend):
    VLLMEngine("/m", weight_transfer=backend)
    (llm,) = RecordingLLM.instances
    assert llm.kwargs["worker_extension_cls"] == WORKER_EXTENSION
    if backend is not None:
        assert llm.kwargs["weight_transfer_config"].backend == backend


def test_a_callers_own_extension_is_kept(fake_vllm):
    VLLMEngine("/m", weight_transfer="nccl", worker_extension_cls="my.Extension")
    assert RecordingLLM.instances[0].kwargs["worker_extension_cls"] == "my.Extension"


def test_the_extension_a_worker_resolves_installs_the_rotary_filter():
    """What vLLM does in each worker (resolve_obj_by_qualname): import the module, which
    installs the filter on the reload logger."""
    pytest.importorskip("vllm")
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from qmath_megatron.inference.vllm_worker import (
        EXTENSION,
        RELOAD_LOGGER,
        QmathWorkerExtension,
        RotaryReloadFilter,
    )

    assert EXTENSION == WORKER_EXTENSION
    assert resolve_obj_by_qualname(WORKER_EXTENSION) is QmathWorkerExtension
    logger = logging.getLogger(RELOAD_LOGGER)
    assert any(isinstance(f, RotaryReloadFilter) for f in logger.filters)

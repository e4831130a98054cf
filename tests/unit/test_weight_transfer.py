"""The CPU-checkable parts of the GPU weight-transfer paths (ipc, nccl), against vLLM's own
classes: what the trainer side hands vLLM's trainer engines and what their worker side
then parses. The transports themselves (CUDA IPC, NCCL) need GPUs: tests/gpu."""

from __future__ import annotations

import pickle

import pytest
import torch

from qmath_megatron.inference.remote import RemoteHandle
from qmath_megatron.inference.weight_transfer import (
    NCCLRendezvous,
    VersionedClient,
    address_towards,
    make_source,
    nccl_rendezvous,
)
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.rl.weight_sync import WeightSync, engine_host, engine_workers

RANKS = {"dp_rank": 0, "dp_size": 1, "tp_rank": 0, "pp_rank": 0}


class Recorder:
    def __init__(self):
        self.calls = []

    def init_weight_transfer_engine(self, init_info):
        self.calls.append(("init", init_info))

    def start_weight_update(self):
        self.calls.append(("start",))

    def update_weights(self, update_info):
        self.calls.append(("update", update_info))

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))


def named():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(11, 8, generator=gen)
    return [
        ("model.embed_tokens.weight", emb),
        ("model.norm.weight", torch.ones(8)),
        ("lm_head.weight", emb),
        ("x.bias", torch.randn(3, generator=gen).bfloat16()),
    ]


def test_bad_backends_and_gpu_backends_without_cuda_are_refused():
    flavor = get_flavor("tiny-tied")
    with pytest.raises(ValueError, match="unknown weight-transfer backend 'shm'"):
        WeightSync([], flavor, 128, [], backend="shm", ranks=RANKS)
    if not torch.cuda.is_available():
        for backend in ("ipc", "nccl"):
            with pytest.raises(
                ValueError, match=f"the {backend} weight-transfer backend needs CUDA"
            ):
                WeightSync([], flavor, 128, [], backend=backend, ranks=RANKS)


def test_versioned_client_finishes_with_the_round_version():
    rec = Recorder()
    client = VersionedClient(rec)
    client.version = "7"
    client.start_weight_update()
    client.update_weights({"a": 1})
    client.update_weights({"a": 2})
    client.finish_weight_update()  # vLLM's trainer engines call it without a version
    assert rec.calls[-1] == ("finish", "7") and client.updates == 2


def test_source_metadata_matches_iteration_as_vllm_checks_it():
    """metadata() is one cached pass; vLLM's NCCL sender checks iteration against it
    (nccl_engine.py _checked_iter), and its receiver rebuilds the dtypes from the names the
    sender derives (str(dtype).split('.')[-1] -> getattr(torch, name))."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    passes = []
    source = make_source()
    source.producer = lambda: (passes.append(1), iter(named()))[1]
    meta = source.metadata()
    assert source.metadata() is meta and len(passes) == 1
    assert [(m.name, m.dtype, m.shape) for m in meta] == [
        (n, t.dtype, tuple(t.shape)) for n, t in named()
    ]
    pairs = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
    assert source.nbytes == sum(t.numel() * t.element_size() for _, t in named())
    # The packed wire format round-trips through vLLM's packer with the receiver's dtypes.
    chunk = pack_tensors(iter(pairs), lambda item: item[1], 1 << 20)
    dtypes = [getattr(torch, str(m.dtype).split(".")[-1]) for m in meta]
    out = unpack_tensor(
        chunk.packed_tensor,
        [m.name for m in meta],
        [list(m.shape) for m in meta],
        dtypes,
        chunk.tensor_sizes,
    )
    for (n, t), (m, u) in zip(named(), out, strict=True):
        assert n == m and u.dtype == t.dtype and torch.equal(u, t)
    # A producer that changes what it yields is caught, naming the parameter.
    source.producer = lambda: iter(named()[:1] + [("model.norm.weight", torch.ones(9))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))


def test_ipc_handles_cross_the_engine_core_pickled(monkeypatch):
    """An in-process LLM with its EngineCore in another process gets the handles pickled
    (msgpack refuses them); vLLM's worker-side update info unpickles them."""
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    from qmath_megatron.inference import engine as engine_mod

    class FakeLLM:
        def __init__(self):
            self.requests = []

        def update_weights(self, request):
            self.requests.append(request)

    handles = [{"GPU-uuid": (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, b"\x01\x02")}]
    info = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[2, 3]], "ipc_handles": handles}
    llm = FakeLLM()
    monkeypatch.setattr(engine_mod, "_engine_core_in_another_process", lambda: True)
    engine_mod.LLMClient(llm).update_weights(info)
    sent = llm.requests[0]["update_info"]
    assert "ipc_handles" not in sent and isinstance(sent["ipc_handles_pickled"], str)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    parsed = IPCWeightTransferUpdateInfo(**sent)
    assert parsed.ipc_handles == handles and parsed.names == ["w"]
    monkeypatch.setattr(engine_mod, "_engine_core_in_another_process", lambda: False)
    engine_mod.LLMClient(llm).update_weights(info)  # in-process: passed as they are
    assert llm.requests[1]["update_info"] is info


def test_nccl_rendezvous_from_the_engine_handle():
    handle = RemoteHandle("127.0.0.1", 5000, b"k", "/m", "nccl", 1 << 20, workers=2)
    again = pickle.loads(pickle.dumps(handle))
    assert again == handle and engine_host(again) == "127.0.0.1" and engine_workers(again) == 2
    # The trainer's sender is rank 0 and hosts the store; the engine's workers follow it.
    assert nccl_rendezvous(engine_host(handle), engine_workers(handle), port=29555) == (
        NCCLRendezvous("127.0.0.1", 29555, 3)
    )
    assert address_towards("localhost") == "127.0.0.1"
    with pytest.raises(ValueError, match="at least one worker"):
        nccl_rendezvous("127.0.0.1", 0, port=1)


def test_sleep_mode_is_refused_on_cpu_before_vllm_starts():
    """vLLM 0.32 has no sleep mode on CPU (platforms/interface.py is_sleep_mode_available:
    CUDA, ROCm, XPU only); the engine says so before loading anything."""
    from qmath_megatron.inference.engine import VLLMEngine, sleep_mode_available

    if sleep_mode_available():
        pytest.skip("this platform has a sleep mode (tests/gpu covers it)")
    with pytest.raises(RuntimeError, match="need vLLM on a GPU"):
        VLLMEngine("/nonexistent", enable_sleep_mode=True)


def test_nccl_round_through_vllms_trainer_engine_with_a_stand_in_transport(monkeypatch):
    """TrainerTransfer(nccl) driven through vLLM's real NCCLTrainerWeightTransferEngine,
    only the NCCL transport replaced (no GPU here): the worker init payload and the update
    info parse with vLLM's worker-side classes, the packed buffers carry every tensor in
    metadata order, the finish carries the version."""
    from vllm.distributed.weight_transfer import nccl_engine
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor

    from qmath_megatron.inference import weight_transfer as wt

    opened, chunks = [], []

    class Group:
        def destroy(self):
            opened.append("destroyed")

    the_group = Group()

    def producer(iterator, group, src, post_iter_func, buffer_size_bytes, num_buffers):
        assert src == 0 and group is the_group and buffer_size_bytes == 400
        while (chunk := pack_tensors(iterator, post_iter_func, buffer_size_bytes)) is not None:
            chunks.append(chunk)

    monkeypatch.setattr(wt, "require_cuda", lambda backend: None)
    monkeypatch.setattr(
        nccl_engine, "open_trainer_endpoint", lambda info: opened.append(info) or the_group
    )
    monkeypatch.setattr(nccl_engine, "packed_nccl_broadcast_producer", producer)
    rec = Recorder()
    transfer = wt.TrainerTransfer(
        "nccl", rec, buffer_bytes=400, rendezvous=NCCLRendezvous("10.0.0.1", 29555, 3)
    )
    ((kind, init),) = rec.calls
    worker = NCCLWeightTransferInitInfo(**init)  # what the engine's workers parse
    assert (worker.master_address, worker.master_port, worker.world_size) == ("10.0.0.1", 29555, 3)
    assert worker.rank_offset == 1 and worker.packed and worker.packed_buffer_size_bytes == 400
    assert (opened[0].master_address, opened[0].rank) == ("10.0.0.1", 0)  # the sender is rank 0

    passes = []
    assert transfer.send(lambda: (passes.append(1), iter(named()))[1], 4) == (
        sum(t.numel() * t.element_size() for _, t in named()),
        1,
    )
    assert len(passes) == 2  # metadata (cached) + data
    assert [c[0] for c in rec.calls[1:]] == ["start", "update", "finish"]
    info = nccl_engine.NCCLWeightTransferUpdateInfo(**rec.calls[2][1])
    assert rec.calls[3] == ("finish", "4") and len(chunks) > 1
    received, k = [], 0
    for chunk in chunks:  # the receiver cuts the stream by the metadata it was sent
        n = len(chunk.names)
        dtypes = [getattr(torch, d) for d in info.dtype_names[k : k + n]]
        received += unpack_tensor(
            chunk.packed_tensor,
            info.names[k : k + n],
            info.shapes[k : k + n],
            dtypes,
            chunk.tensor_sizes,
        )
        k += n
    for (n, t), (m, u) in zip(named(), received, strict=True):
        assert n == m and u.dtype == t.dtype and torch.equal(u, t)
    transfer.send(lambda: iter(named()), 5)
    assert rec.calls[-1] == ("finish", "5") and len(passes) == 2  # metadata stays cached
    rec.shutdown_weight_transfer_engine = lambda: rec.calls.append(("release",))
    transfer.shutdown()  # the trainer's communicator, then the engine's
    assert opened[-1] == "destroyed" and rec.calls[-1] == ("release",)


def test_ipc_round_through_vllms_trainer_engine_with_a_stand_in_transport(monkeypatch):
    """TrainerTransfer(ipc) driven through vLLM's real IPCTrainerWeightTransferEngine, only
    the CUDA parts replaced (device UUID, the IPC buffer, ipc_collect): the engine is told
    ``packed=True``, every chunk's update info parses with vLLM's worker-side class and
    carries this GPU's handle, the finish carries the version."""
    from types import SimpleNamespace

    from vllm.distributed.weight_transfer import ipc_engine
    from vllm.distributed.weight_transfer.packed_tensor import PackedIpcChunk, pack_tensors

    from qmath_megatron.inference import weight_transfer as wt

    def producer(iterator, gpu_uuid, post_iter_func, buffer_size_bytes):
        while (chunk := pack_tensors(iterator, post_iter_func, buffer_size_bytes)) is not None:
            yield PackedIpcChunk(
                chunk.names,
                chunk.shapes,
                [str(d).split(".")[-1] for d in chunk.dtypes],
                chunk.tensor_sizes,
                {gpu_uuid: ("args",)},
            )

    monkeypatch.setattr(wt, "require_cuda", lambda backend: None)
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="GPU-0")
    )
    monkeypatch.setattr(ipc_engine, "packed_ipc_producer", producer)
    monkeypatch.setattr(
        ipc_engine.IPCTrainerWeightTransferEngine, "_post_send_sync", staticmethod(lambda: None)
    )
    rec = Recorder()
    transfer = wt.TrainerTransfer("ipc", rec, buffer_bytes=400)
    assert rec.calls == [("init", {"packed": True})]
    assert transfer.send(lambda: iter(named()), 3)[1] == 2  # two chunks of <= 400 bytes
    kinds = [c[0] for c in rec.calls[1:]]
    assert kinds == ["start", "update", "update", "finish"] and rec.calls[-1] == ("finish", "3")
    names = []
    for _, update in rec.calls[2:4]:
        info = ipc_engine.IPCWeightTransferUpdateInfo(**update)  # what the workers parse
        assert info.ipc_handles == {"GPU-0": ("args",)} and len(info.tensor_sizes) == len(
            info.names
        )
        names += info.names
    assert names == [n for n, _ in named()]

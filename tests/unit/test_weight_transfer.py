"""The weight transports behind one interface (rl/weight_sync/): the registry and factory,
each transport's set-up, rounds, sleep/wake cycle and shutdown with stand-in engines, and
that the GRPO task never branches on the transport. The CPU-checkable parts of the GPU
paths (ipc, nccl) against vLLM's own classes: what the trainer side hands vLLM's trainer
engines and what their worker side then parses. CUDA IPC and NCCL themselves need GPUs:
tests/gpu."""

from __future__ import annotations

import ast
import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from qmath_megatron.inference.remote import RemoteHandle
from qmath_megatron.inference.weight_transfer import (
    BACKENDS,
    NCCLRendezvous,
    VersionedClient,
    address_towards,
    make_source,
    nccl_rendezvous,
)
from qmath_megatron.models.flavors import get_flavor
from qmath_megatron.rl.engines import PLACEMENTS
from qmath_megatron.rl.weight_sync import (
    TRANSPORTS,
    WeightTransport,
    base,
    build_transport,
    rounds,
    shm,
)
from qmath_megatron.rl.weight_sync.nccl import engine_host, engine_workers

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
    with pytest.raises(
        ValueError, match=r"unknown weight-transfer backend 'shm' \(known: ipc, nccl, qmath_shm\)"
    ):
        build_transport("shm", [], flavor, 128, [], ranks=RANKS)
    with pytest.raises(ValueError, match="bucket_mb must be positive"):
        build_transport("qmath_shm", [], flavor, 128, [], ranks=RANKS, bucket_mb=0)
    if not torch.cuda.is_available():
        for backend in ("ipc", "nccl"):
            with pytest.raises(
                ValueError, match=f"the {backend} weight-transfer backend needs CUDA"
            ):
                build_transport(backend, [], flavor, 128, [], ranks=RANKS)


def test_every_backend_has_a_registered_transport():
    # The engines' backends (VLLMEngine(weight_transfer=...)) and the trainer's transports
    # are the same set, each transport registered under its own name.
    assert sorted(TRANSPORTS) == sorted(BACKENDS)
    for name, cls in TRANSPORTS.items():
        assert issubclass(cls, WeightTransport) and cls.name == name
    from qmath_megatron.rl.weight_sync.factory import register_transport

    with pytest.raises(ValueError, match="'ipc' is registered twice"):
        register_transport("ipc")(type("Again", (), {}))


# ----------------------------------------------------------------------------- transports


class FakeSleeper:
    """Global rank 0's engines as the transport sees them: wake_up / sleep, recorded."""

    def __init__(self, calls: list):
        self.calls = calls

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))


class FileRecorder(Recorder):
    """A client that checks each update names a bucket file that exists (qmath_shm)."""

    def update_weights(self, update_info):
        path = Path(update_info["path"])
        assert path.is_file()
        self.calls.append(("update", path))


def _stub_export(monkeypatch, seen: list) -> None:
    def buckets(chunks, flavor, padded_vocab, *, include_lm_head, dtype, bucket_bytes):
        seen.append((include_lm_head, bucket_bytes))
        tensors = named()
        return iter([tensors[:2], tensors[2:]])

    monkeypatch.setattr(shm, "iter_hf_buckets", buckets)


def test_shm_transport_rounds_buckets_and_versions(monkeypatch):
    flavor = get_flavor("tiny-tied")
    seen: list = []
    _stub_export(monkeypatch, seen)
    a, b = FileRecorder(), FileRecorder()
    sync = build_transport("qmath_shm", [], flavor, 128, [a, b], ranks=RANKS, bucket_mb=0.5)
    stats = sync.sync()
    # One start, a file per bucket and engine (removed once loaded), one finish each.
    for rec in (a, b):
        assert [c[0] for c in rec.calls] == ["start", "update", "update", "finish"]
        assert rec.calls[-1] == ("finish", "1")
        assert not any(c[1].exists() for c in rec.calls if c[0] == "update")
    assert seen == [(True, 512 << 10)]  # bucket_mb in bytes only where the export needs it
    total = sum(t.numel() * t.element_size() for _, t in named())
    assert (stats.version, stats.bytes, stats.buckets, stats.engines) == (1, total, 2, 2)
    assert (
        sync.sync(version=7).version == 7 and sync.version == 7 and a.calls[-1] == ("finish", "7")
    )
    assert sync.sync().version == 8
    sync.close()
    # A non-sender rank of the replica iterates the export (a collective) and sends nothing.
    other = FileRecorder()
    follower = build_transport("qmath_shm", [], flavor, 128, [other], ranks={**RANKS, "tp_rank": 1})
    stats = follower.sync()
    assert other.calls == [] and (stats.bytes, stats.buckets, stats.engines) == (total, 2, 0)
    # A replica without an engine (engine i belongs to replica i mod DP) skips the export.
    seen.clear()
    idle = build_transport(
        "qmath_shm", [], flavor, 128, [other], ranks={**RANKS, "dp_rank": 1, "dp_size": 2}
    )
    assert idle.sync().bytes == 0 and seen == [] and other.calls == []


def test_sleeping_engines_wake_around_the_sync_and_the_rollout(monkeypatch):
    flavor = get_flavor("tiny-tied")
    _stub_export(monkeypatch, [])
    calls: list = []
    monkeypatch.setattr(base.dist, "barrier", lambda: calls.append(("barrier",)))
    engine = FileRecorder()
    engine.calls = calls  # one timeline for the engine, the sleeper and the barrier
    sync = build_transport(
        "qmath_shm",
        [],
        flavor,
        128,
        [engine],
        ranks=RANKS,
        engines_sleep=True,
        sleeper=FakeSleeper(calls),
    )
    sync.sync()
    sync.prepare_for_generation()
    sync.finish_generation()
    kinds = [c[0] if c[0] != "wake_up" else c for c in calls]
    assert kinds == [
        ("wake_up", ["weights"]),  # the sync overwrites the weights: they come back first
        "barrier",  # every sender's engine is awake before any sends
        "start",
        "update",
        "update",
        "finish",
        ("wake_up", ["kv_cache"]),  # then the KV cache, for the rollout
        "sleep",  # level 1 while the trainer steps
    ]
    assert calls[-1] == ("sleep", 1) and sync.sleep_wake_s > 0
    # Engines that do not sleep (remote, or CPU) are never asked; nothing is timed.
    calls.clear()
    awake = build_transport(
        "qmath_shm", [], flavor, 128, [FileRecorder()], ranks=RANKS, sleeper=FakeSleeper(calls)
    )
    awake.sync()
    awake.prepare_for_generation()
    awake.finish_generation()
    assert calls == [] and awake.sleep_wake_s == 0.0


class FakeTransfer:
    """Stands in for TrainerTransfer (vLLM's trainer engines need CUDA): records its set-up,
    answers each round with fixed (bytes, chunks)."""

    made: list = []

    def __init__(self, backend, client, *, is_sender, buffer_bytes, rendezvous):
        self.backend, self.client, self.is_sender = backend, client, is_sender
        self.buffer_bytes, self.rendezvous = buffer_bytes, rendezvous
        self.rounds: list = []
        self.closed = False
        FakeTransfer.made.append(self)

    def send(self, producer, version):
        self.rounds.append((producer, version))
        return 1000, 3

    def shutdown(self):
        self.closed = True


@pytest.fixture
def fake_transfers(monkeypatch):
    FakeTransfer.made = []
    monkeypatch.setattr(rounds, "require_cuda", lambda backend: None)
    monkeypatch.setattr(rounds, "TrainerTransfer", FakeTransfer)
    monkeypatch.setattr(rounds, "iter_hf_tensors", lambda *a, **k: iter(named()))
    return FakeTransfer.made


def test_nccl_transport_sets_up_a_rendezvous_per_engine_and_shuts_down(fake_transfers):
    flavor = get_flavor("tiny-tied")

    class Handle:  # a RemoteHandle's host and workers; connect() gives its client
        def __init__(self, workers: int):
            self.host, self.workers, self.client = "127.0.0.1", workers, Recorder()

        def connect(self):
            return self.client

    handles = [Handle(2), Handle(3)]
    sync = build_transport("nccl", [], flavor, 128, handles, ranks=RANKS, bucket_mb=2)
    assert [t.backend for t in fake_transfers] == ["nccl", "nccl"]
    # The sender is rank 0 of a group of 1 + the engine's workers, reached at its host.
    assert [(t.rendezvous.master_address, t.rendezvous.world_size) for t in fake_transfers] == [
        ("127.0.0.1", 3),
        ("127.0.0.1", 4),
    ]
    assert all(t.buffer_bytes == 2 << 20 and t.is_sender for t in fake_transfers)
    assert [t.client for t in fake_transfers] == [h.client for h in handles]
    stats = sync.sync()
    assert (stats.version, stats.bytes, stats.buckets, stats.engines) == (1, 1000, 6, 2)
    assert [r[1] for t in fake_transfers for r in t.rounds] == [1, 1]
    produce = fake_transfers[0].rounds[0][0]  # a fresh export per call (vLLM's WeightSource)
    assert [n for n, _ in produce()] == [n for n, _ in produce()] == [n for n, _ in named()]
    sync.close()
    assert all(t.closed for t in fake_transfers) and sync.transfers == []
    # A non-sender rank takes part in every round without a client or a group of its own.
    fake_transfers.clear()
    build_transport("nccl", [], flavor, 128, handles[:1], ranks={**RANKS, "pp_rank": 1})
    (t,) = fake_transfers
    assert t.client is None and t.rendezvous is None and not t.is_sender
    # NCCL refuses two ranks on one GPU: its engines are never the colocated, sleeping ones.
    with pytest.raises(ValueError, match="nccl reaches engines on other GPUs"):
        build_transport("nccl", [], flavor, 128, handles, ranks=RANKS, engines_sleep=True)


def test_ipc_transport_buffer_holds_the_largest_tensor_and_engines_split_evenly(
    fake_transfers,
):
    flavor = get_flavor("tiny-tied")
    engines = [Recorder(), Recorder()]
    small = build_transport(
        "ipc", [], flavor, 128, engines, ranks=RANKS, bucket_mb=1 / 1024, dtype=torch.bfloat16
    )
    largest = (
        max(flavor.vocab_size, flavor.ffn_hidden_size, flavor.num_attention_heads * flavor.head_dim)
        * flavor.hidden_size
        * 2
    )
    assert largest > 1024 and all(t.buffer_bytes == largest for t in fake_transfers)
    assert all(t.rendezvous is None and t.client is e for t, e in zip(fake_transfers, engines))
    small.close()
    fake_transfers.clear()
    # Tensors sent in the parameters' dtype (fp32 here) by default; a bucket larger than
    # any tensor is the buffer.
    chunks = [torch.nn.Linear(2, 2)]
    big = build_transport("ipc", chunks, flavor, 128, engines, ranks=RANKS, bucket_mb=64)
    assert 2 * largest == big.largest_tensor_bytes() < 64 << 20
    assert all(t.buffer_bytes == 64 << 20 for t in fake_transfers)
    # vLLM merges the handles of every rank: every replica must send as often.
    with pytest.raises(ValueError, match="3 engines over 2 replicas"):
        build_transport("ipc", [], flavor, 128, [Recorder()] * 3, ranks={**RANKS, "dp_size": 2})


# ----------------------------------------------------------------------------- the GRPO task

TRANSPORT_WORDS = {"backend", "weight_transfer", "placement", "sleep", "engines_sleep"}


def transport_branches(source: str) -> list[str]:
    """Where ``source`` names a transport or a placement as a literal, or decides (if /
    while / conditional expression / comparison / boolean operation / assert) on anything
    called backend, weight_transfer, placement or sleep."""
    tree = ast.parse(source)
    names = set(TRANSPORTS) | set(PLACEMENTS)
    found = [
        f"line {n.lineno}: literal {n.value!r}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in names
    ]
    tests = [
        n.test for n in ast.walk(tree) if isinstance(n, ast.If | ast.IfExp | ast.While | ast.Assert)
    ]
    tests += [n for n in ast.walk(tree) if isinstance(n, ast.Compare | ast.BoolOp)]
    tests += [c for n in ast.walk(tree) if isinstance(n, ast.comprehension) for c in n.ifs]
    for test in {id(t): t for t in tests}.values():  # an if's test may be a comparison
        words = {a.attr for a in ast.walk(test) if isinstance(a, ast.Attribute)}
        words |= {a.id for a in ast.walk(test) if isinstance(a, ast.Name)}
        if words & TRANSPORT_WORDS:
            found.append(f"line {test.lineno}: decides on {sorted(words & TRANSPORT_WORDS)}")
    return found


def test_the_grpo_task_never_branches_on_the_transport_or_the_placement():
    # The check sees the branches the task used to have.
    assert len(transport_branches('if layout.backend == "ipc":\n    pass\n')) == 2
    assert transport_branches("if self.layout.sleep and is_main:\n    wake()\n")
    assert transport_branches("x = a if rl.placement == p else b\n")
    assert transport_branches("sleeping = [e for e in engines if e.sleep]\n")
    assert transport_branches("if rl.task == 'math':\n    pass\n") == []
    task = Path(importlib.util.find_spec("qmath_megatron.rl.task").origin)
    assert transport_branches(task.read_text()) == []


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

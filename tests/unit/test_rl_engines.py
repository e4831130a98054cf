"""Rollout-engine placement (rl/engines.py): backend and GPU validation, the prompt split,
per-chunk seeds, and RolloutEngines' fan-out over stand-in engines (the real vLLM engines
run in tests/distributed/test_grpo.py); the head_dim check for engines on CPU; vLLM's
rotary-embedding reload warning dropped (one real CPU engine, two in-place updates)."""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass

import pytest

from qmath_megatron.inference.engine import Completion, SamplingParams, request_seed
from qmath_megatron.rl.config import RLConfig
from qmath_megatron.rl.engines import (
    CPU_ATTENTION_HEAD_DIMS,
    EngineLayout,
    RolloutEngines,
    assign_gpus,
    check_cpu_attention,
    check_external_senders,
    check_ipc_engines,
    dry_run_engines,
    engine_seed,
    external_backend,
    fan_out,
    format_dry_run_engines,
    listen_address,
    replica_ranks,
    resolve_weight_transfer,
    split_prompts,
    trainer_gpus,
)
from qmath_megatron.rl.recipes import RECIPES


def test_backend_auto_and_impossible_combinations():
    assert resolve_weight_transfer("auto", "colocated", on_gpu=False) == "qmath_shm"
    assert resolve_weight_transfer("auto", "remote", on_gpu=False) == "qmath_shm"
    assert resolve_weight_transfer("auto", "colocated", on_gpu=True) == "ipc"
    assert resolve_weight_transfer("auto", "remote", on_gpu=True) == "nccl"
    for placement in ("colocated", "remote"):
        for gpu in (False, True):
            assert resolve_weight_transfer("qmath_shm", placement, gpu) == "qmath_shm"
    assert resolve_weight_transfer("ipc", "colocated", True) == "ipc"
    assert resolve_weight_transfer("nccl", "remote", True) == "nccl"
    with pytest.raises(ValueError, match="ipc needs rl.placement=colocated"):
        resolve_weight_transfer("ipc", "remote", True)
    with pytest.raises(ValueError, match="nccl needs rl.placement=remote"):
        resolve_weight_transfer("nccl", "colocated", True)
    for backend in ("ipc", "nccl"):
        with pytest.raises(ValueError, match="needs GPUs"):
            resolve_weight_transfer(backend, "colocated" if backend == "ipc" else "remote", False)
    with pytest.raises(ValueError, match="rl.placement"):
        resolve_weight_transfer("auto", "elsewhere", True)
    # The config refuses what no machine can run, at parse time.
    with pytest.raises(ValueError, match="ipc needs rl.placement=colocated"):
        RLConfig(placement="remote", weight_transfer="ipc")
    with pytest.raises(ValueError, match="engine_gpus is for rl.placement=remote"):
        RLConfig(placement="colocated", engine_gpus=[3])


def test_gpu_assignment():
    node = list(range(8))
    assert assign_gpus("colocated", 4, 2, node, None) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert assign_gpus("colocated", 1, 1, node, None) == [[0]]
    with pytest.raises(ValueError, match="9 GPUs, but the trainer has 8"):
        assign_gpus("colocated", 3, 3, node, None)
    with pytest.raises(ValueError, match="engine_gpus is for"):
        assign_gpus("colocated", 1, 1, node, [0])
    assert assign_gpus("remote", 2, 2, [0, 1, 2, 3], [4, 5, 6, 7]) == [[4, 5], [6, 7]]
    with pytest.raises(ValueError, match="needs rl.engine_gpus"):
        assign_gpus("remote", 1, 1, [0], None)
    with pytest.raises(ValueError, match=r"\[3\] are the trainer's GPUs"):
        assign_gpus("remote", 2, 1, [0, 1, 2, 3], [3, 4])
    with pytest.raises(ValueError, match="lists 3 GPUs; rl.engines x rl.engine_tp = 4"):
        assign_gpus("remote", 2, 2, [0], [4, 5, 6])
    with pytest.raises(ValueError, match="repeats a GPU"):
        assign_gpus("remote", 2, 1, [0], [4, 4])
    # The trainer's physical GPUs: local rank r on the r-th visible device.
    assert trainer_gpus(4, None) == [0, 1, 2, 3]
    assert trainer_gpus(2, "6,7,2") == [6, 7]
    with pytest.raises(ValueError, match="lists 1 GPUs"):
        trainer_gpus(2, "3")
    with pytest.raises(ValueError, match="integer GPU ids"):
        trainer_gpus(1, "GPU-abc")


def test_ipc_engines_must_sit_on_their_replicas_gpus():
    gpus = assign_gpus("colocated", 4, 2, list(range(8)), None)
    # TP=2 x DP=4: replica i on GPUs 2i, 2i+1, and engine i there.
    assert [replica_ranks(i, tp=2, cp=1, dp=4, pp=1) for i in range(4)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    check_ipc_engines(gpus, [set(replica_ranks(i, 2, 1, 4, 1)) for i in range(4)])
    # Megatron's order tp-cp-dp-pp: TP=2, CP=2, DP=2, PP=2 (16 ranks).
    assert replica_ranks(1, tp=2, cp=2, dp=2, pp=2) == [4, 5, 6, 7, 12, 13, 14, 15]
    # TP=4 x DP=2: engine 1 (replica 1 = GPUs 4..7) would sit on GPUs 2, 3.
    replicas = [set(replica_ranks(i % 2, 4, 1, 2, 1)) for i in range(4)]
    with pytest.raises(ValueError, match=r"engine 1 is on GPUs \[2, 3\] but its data-parallel"):
        check_ipc_engines(gpus, replicas)
    with pytest.raises(ValueError, match="engine 0 is on GPUs"):
        check_ipc_engines([[0]], [set()])  # the replica is on another node


def test_senders_on_other_nodes_need_nccl():
    for backend in ("qmath_shm", "ipc", "nccl"):
        assert listen_address(backend, [True, True]) == "127.0.0.1"
    assert listen_address("nccl", [True, False]) == "0.0.0.0"
    for backend in ("qmath_shm", "ipc"):
        with pytest.raises(ValueError, match=f"engine 1's sender .* another node.*{backend}"):
            listen_address(backend, [True, False])


def test_recipes_layouts_in_dry_run():
    seven = dry_run_engines(RECIPES["qwen25_math_7b_grpo"](), 8)
    assert seven["backend"] == "ipc" and seven["sleep_wake"] and "problem" not in seven
    assert seven["gpus"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    big = RECIPES["qwen25_math_72b_grpo"]()
    assert (big.rl.placement, big.rl.weight_transfer, big.rl.engines, big.rl.engine_tp) == (
        "remote",
        "nccl",
        8,
        8,
    )
    # Engines on nodes of their own, started by `qmath engine serve` (slurm/grpo.sbatch).
    external = dry_run_engines(big, 64)
    assert "problem" not in external and external["handles_dir"] == "engines"
    assert external["backend"] == "nccl"
    text = format_dry_run_engines(external)
    assert "NOT RUNNABLE" not in text and "qmath engine serve --handle-dir engines" in text
    big.rl.engine_handles = None  # without them: engines only on the launching node
    assert "engines on other nodes are not launched" in dry_run_engines(big, 64)["problem"]
    here = dry_run_engines(big, 4)  # pretend: engines on the launching node's free GPUs
    assert "problem" in here
    big.rl.engine_gpus, big.rl.engines, big.rl.engine_tp = [4, 5, 6, 7], 1, 4
    ok = dry_run_engines(big, 4)
    assert ok["backend"] == "nccl" and ok["gpus"] == [[4, 5, 6, 7]] and not ok["sleep_wake"]


def test_split_is_contiguous_balanced_and_complete():
    assert split_prompts(4, 2) == [(0, 2), (2, 4)]
    assert split_prompts(5, 2) == [(0, 3), (3, 5)]
    assert split_prompts(1, 3) == [(0, 1), (1, 1), (1, 1)]
    for n in range(0, 13):
        for e in range(1, 6):
            chunks = split_prompts(n, e)
            assert len(chunks) == e and chunks[0][0] == 0 and chunks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
            sizes = [b - a for a, b in chunks]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        split_prompts(3, 0)


def test_chunk_seeds_reproduce_the_unsplit_request_seeds():
    for seed in (0, 1, 12345, 2**31 - 2):
        for n in (1, 8):
            for offset in (0, 1, 5, 1000):
                s = engine_seed(seed, offset, n)
                for j in range(4):
                    assert request_seed(s, j * n) == request_seed(seed, (offset + j) * n)
    assert engine_seed(7, 0, 8) == 7


def test_fan_out_runs_at_once_keeps_order_and_hands_back_failures():
    meet = threading.Barrier(3, timeout=10)  # passes only if all three calls run at once

    def call(i: int) -> tuple[int, str]:
        meet.wait()
        if i == 1:
            raise RuntimeError("engine 1 died")
        return i, threading.current_thread().name

    results = fan_out(call, [0, 1, 2])
    assert [r[0] for r in (results[0], results[2])] == [0, 2]
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "engine 1 died"
    assert threading.main_thread().name not in (results[0][1], results[2][1])
    # One item: the caller's own thread, no thread started.
    assert fan_out(lambda i: (i, threading.current_thread().name), [7]) == [
        (7, threading.current_thread().name)
    ]
    assert fan_out(call, []) == []


@dataclass
class FakeEngine:
    """Stands in for a RemoteEngine: records calls; its completions name the prompt and
    the request seed vLLM would get."""

    index: int
    env: dict | None = None
    kwargs: dict | None = None
    closed: bool = False
    calls: list | None = None

    handle = property(lambda self: f"handle{self.index}")
    tokenizer = property(lambda self: f"tok{self.index}")

    def generate(self, prompts, params):
        self.calls = (self.calls or []) + [(list(prompts), params.seed)]
        return [
            [Completion(f"p{p[0]}", [p[0]], [0.0], "length", None, 3) for _ in range(params.n)]
            for p in prompts
        ]

    def weight_version(self):
        return 3

    def sleep(self, level=1):
        self.calls = (self.calls or []) + [("sleep", level)]

    def wake_up(self, tags=None):
        self.calls = (self.calls or []) + [("wake_up", tags)]

    def close(self):
        self.closed = True


def _factory(made, fail=None):
    lock = threading.Lock()  # RolloutEngines.start calls it from one thread per engine

    def make(model_dir, *, weight_transfer, env, **kwargs):
        with lock:
            i = len(made)
            made.append(FakeEngine(i, env, {"weight_transfer": weight_transfer, **kwargs}))
        if fail is not None and i == fail:
            raise RuntimeError("engine died")
        return made[-1]

    return make


def test_rollout_engines_split_order_seeds_and_lifecycle():
    layout = EngineLayout("colocated", 3, 2, "ipc", [[0, 1], [2, 3], [4, 5]], True)
    made: list[FakeEngine] = []
    engines = RolloutEngines.start(layout, "m", {"seed": 1}, factory=_factory(made))
    assert engines.handles == ["handle0", "handle1", "handle2"] and engines.tokenizer == "tok0"
    assert sorted(e.env["CUDA_VISIBLE_DEVICES"] for e in made) == ["0,1", "2,3", "4,5"]
    assert all(
        e.kwargs
        == {
            "weight_transfer": "ipc",
            "seed": 1,
            "tensor_parallel_size": 2,
            "enable_sleep_mode": True,
        }
        for e in made
    )
    prompts = [[10 + i] for i in range(7)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=1, seed=42)
    engines.reset_usage()
    groups = engines.generate(prompts, params)
    assert [g[0].text for g in groups] == [f"p{10 + i}" for i in range(7)]
    assert all(len(g) == 2 for g in groups) and engines.used == {0, 1, 2}
    by_engine = {e.index: e.calls[0] for e in made}
    assert [len(by_engine[i][0]) for i in range(3)] == [3, 2, 2]  # contiguous chunks
    assert by_engine[1][0] == [[13], [14]]
    assert by_engine[1][1] == engine_seed(42, 3, 2) and by_engine[0][1] == 42
    assert engines.weight_versions() == [3, 3, 3]
    engines.reset_usage()
    engines.generate(prompts[:1], params)  # fewer prompts than engines: only engine 0 works
    assert engines.used == {0}
    engines.wake_up(["weights"])
    engines.sleep(level=1)
    assert all(e.calls[-2:] == [("wake_up", ["weights"]), ("sleep", 1)] for e in made)
    engines.close()
    assert all(e.closed for e in made)


def test_rollout_engines_without_sleep_and_failed_start():
    layout = EngineLayout("colocated", 2, 1, "qmath_shm", None, False)
    made: list[FakeEngine] = []
    engines = RolloutEngines.start(layout, "m", {}, factory=_factory(made))
    assert all(e.env is None and "enable_sleep_mode" not in e.kwargs for e in made)
    engines.wake_up()
    engines.sleep()
    assert all(e.calls is None for e in made)  # CPU: never called (vLLM refuses it there)
    made = []
    with pytest.raises(RuntimeError, match="1 of 3 rollout engines did not start: engine died"):
        RolloutEngines.start(
            EngineLayout("remote", 3, 1, "qmath_shm", None, False),
            "m",
            {},
            factory=_factory(made, fail=1),
        )
    assert len(made) == 3 and [e.closed for e in made] == [True, False, True]


# ----------------------------------------------------------------------------- external engines


def _handle(port: int = 4000, backend: str = "qmath_shm", node: str = "n1"):
    from qmath_megatron.inference.remote import RemoteHandle

    return RemoteHandle("10.0.0.5", port, b"\x01" * 16, "/m", backend, 1 << 20, 8, node)


def test_handle_file_roundtrip_mode_and_name(tmp_path):
    from qmath_megatron.inference.serve import handle_files, read_handle_file, write_handle_file

    h = _handle()
    path = write_handle_file(tmp_path, h)
    assert path.name == "engine-10.0.0.5-4000.json" and path.stat().st_mode & 0o777 == 0o600
    assert read_handle_file(path) == h
    write_handle_file(tmp_path, _handle(port=4001))  # a second engine of the node: no clash
    assert [p.name for p in handle_files(tmp_path)] == [
        "engine-10.0.0.5-4000.json",
        "engine-10.0.0.5-4001.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in handle_files(tmp_path)]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"port": "80"}, "'port' missing or not int"),
        ({"authkey": "zz"}, "authkey is not hex"),
        ({"backend": "rdma"}, "unknown backend 'rdma'"),
        ({"workers": 0}, "out of range"),
        ({"host": None}, "'host' missing"),
    ],
)
def test_handle_file_validation(tmp_path, edit, message):
    import json

    from qmath_megatron.inference.serve import handle_record, read_handle_file

    record = {**handle_record(_handle()), **edit}
    path = tmp_path / "engine-x-1.json"
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"engine handle file {path}: .*{message}"):
        read_handle_file(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        read_handle_file(path)


def test_waiting_for_handle_files_progress_timeout_and_too_many(tmp_path):
    from qmath_megatron.inference.serve import wait_for_handles, write_handle_file

    now = [0.0]
    lines: list[str] = []

    def tick(s: float) -> None:
        now[0] += s

    d = tmp_path / "engines"  # not even created yet: counts as 0 files
    with pytest.raises(
        ValueError,
        match=rf"timed out after 100 s waiting for 2 engine handle "
        rf"files in {d}: found 0",
    ):
        wait_for_handles(d, 2, 100, poll_s=5, log=lines.append, clock=lambda: now[0], sleep=tick)
    assert len(lines) == 3 and "0 of 2 after 30 s" in lines[0]  # every ~30 s
    d.mkdir()
    write_handle_file(d, _handle(4000))
    (d / ".engine-10.0.0.5-4001.json.7.tmp").write_text("{")  # being written: not counted
    now[0] = 0.0

    def arrive(s: float) -> None:  # the second engine comes up while rank 0 waits
        now[0] += s
        write_handle_file(d, _handle(4001))

    got = wait_for_handles(d, 2, 100, log=lines.append, clock=lambda: now[0], sleep=arrive)
    assert [h.port for h in got] == [4000, 4001]
    write_handle_file(d, _handle(4002))
    with pytest.raises(ValueError, match=f"3 engine handle files in {d}, expected rl.engines=2"):
        wait_for_handles(d, 2, 100)


def test_external_engine_backend_and_senders():
    shm, nccl = [_handle(backend="qmath_shm")] * 2, [_handle(backend="nccl")] * 2
    assert external_backend(shm, "auto", on_gpu=False) == "qmath_shm"
    assert external_backend(shm, "qmath_shm", on_gpu=True) == "qmath_shm"
    assert external_backend(nccl, "auto", on_gpu=True) == "nccl"
    with pytest.raises(ValueError, match="rl.weight_transfer=nccl but the engines .* qmath_shm"):
        external_backend(shm, "nccl", on_gpu=True)
    with pytest.raises(ValueError, match="nccl needs GPUs"):
        external_backend(nccl, "auto", on_gpu=False)
    with pytest.raises(ValueError, match="different weight transfers"):
        external_backend([shm[0], nccl[0]], "auto", on_gpu=True)
    with pytest.raises(ValueError, match="cannot use ipc"):
        external_backend([_handle(backend="ipc")], "auto", on_gpu=True)
    check_external_senders("qmath_shm", ["a", "b"], [{"a"}, {"b"}])
    check_external_senders("nccl", ["a", "b"], [{"c"}, {"d"}])
    with pytest.raises(ValueError, match="external engine 1 runs on b but its sender .* on c"):
        check_external_senders("qmath_shm", ["a", "b"], [{"a"}, {"c"}])


def test_engine_handles_config_rules():
    assert RLConfig(placement="remote", engine_handles="/s/e").engine_handles == "/s/e"
    with pytest.raises(ValueError, match="engine_handles .* needs rl.placement=remote"):
        RLConfig(placement="colocated", engine_handles="/s/e")
    with pytest.raises(ValueError, match="ipc"):
        RLConfig(placement="remote", engine_handles="/s/e", weight_transfer="ipc")
    with pytest.raises(ValueError, match="engine_gpus places engines the trainer starts"):
        RLConfig(placement="remote", engine_handles="/s/e", engine_gpus=[1])


def test_external_engines_connect_and_close_only_disconnects(tmp_path):
    from qmath_megatron.rl.engines import find_external

    class Client:
        def __init__(self, handle):
            self.handle, self.closed = handle, False

        def close(self):
            self.closed = True

    class Handle:
        def __init__(self, ok: bool):
            self.ok, self.host, self.port, self.node, self.clients = ok, "h", 1, "n", []

        def connect(self):
            if not self.ok:
                raise ConnectionRefusedError("refused")
            self.clients.append(Client(self))
            return self.clients[-1]

    rl = RLConfig(placement="remote", engines=2, engine_handles=str(tmp_path))
    layout = EngineLayout("remote", 2, 1, "qmath_shm", None, False, str(tmp_path))
    good = [Handle(True), Handle(True)]
    engines = RolloutEngines.connect(layout, good)
    assert engines.handles == good and "external engine(s)" in layout.describe()
    engines.close()
    assert all(h.clients[0].closed for h in good)  # no shutdown call: the engines keep running
    bad = [Handle(True), Handle(False)]
    with pytest.raises(RuntimeError, match="external engine at h:1 .* does not answer"):
        RolloutEngines.connect(layout, bad)
    assert bad[0].clients[0].closed
    from qmath_megatron.inference.serve import write_handle_file

    write_handle_file(tmp_path, _handle(4000, backend="qmath_shm"))
    write_handle_file(tmp_path, _handle(4001, backend="qmath_shm"))
    final, handles = find_external(layout, rl, on_gpu=False)
    assert final.backend == "qmath_shm" and [h.port for h in handles] == [4000, 4001]


def test_serve_backend_and_engine_arguments():
    from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
    from qmath_megatron.inference.serve import engine_kwargs, register, serve_backend

    assert serve_backend("auto", on_gpu=False) == "qmath_shm"
    assert serve_backend("auto", on_gpu=True) == "nccl"
    assert serve_backend("qmath_shm", on_gpu=True) == "qmath_shm"
    with pytest.raises(ValueError, match="nccl needs GPUs"):
        serve_backend("nccl", on_gpu=False)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())  # as qmath_megatron/cli.py does
    parse = parser.parse_args
    args = parse(
        [
            "engine",
            "serve",
            "--model",
            "m",
            "--handle-dir",
            "d",
            "--seed",
            "3",
            "--max-model-len",
            "24",
            "--skip-tokenizer-init",
        ]
    )
    assert args.host == "0.0.0.0" and args.weight_transfer == "auto"
    assert engine_kwargs(args, on_gpu=False) == {
        **CPU_VLLM_DEFAULTS,
        "seed": 3,
        "max_model_len": 24,
        "skip_tokenizer_init": True,
    }
    gpu = parse(
        [
            "engine",
            "serve",
            "--model",
            "m",
            "--handle-dir",
            "d",
            "--tensor-parallel-size",
            "8",
            "--gpu-memory-utilization",
            "0.9",
            "--dtype",
            "bfloat16",
        ]
    )
    assert engine_kwargs(gpu, on_gpu=True) == {
        "seed": 0,
        "tensor_parallel_size": 8,
        "gpu_memory_utilization": 0.9,
        "dtype": "bfloat16",
    }
    with pytest.raises(ValueError, match="needs GPUs"):
        engine_kwargs(gpu, on_gpu=False)
    gpu.gpu_memory_utilization = 1.5
    with pytest.raises(ValueError, match="gpu-memory-utilization"):
        engine_kwargs(gpu, on_gpu=True)


def test_cpu_engines_need_a_head_dim_vllms_cpu_attention_runs():
    from qmath_megatron.config.overrides import apply_overrides
    from qmath_megatron.models.flavors import FLAVORS, get_flavor

    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(CPU_ATTENTION_HEAD_DIMS) == CPUAttentionBackend.get_supported_head_sizes()
    with pytest.raises(ValueError) as err:
        check_cpu_attention(get_flavor("tiny-qwen-vocab"))
    assert "\n" not in str(err.value) and str(err.value).startswith(
        "model.flavor=tiny-qwen-vocab has head_dim 16 (hidden 64 / 4 heads)"
    )
    for name in ("tiny-qwen-vocab-hd32", "tiny-rl-toy", "qwen2.5-0.5b", "qwen2.5-math-72b"):
        check_cpu_attention(FLAVORS[name])
    # --dry-run shows it beside the GPU plan.
    math = RECIPES["tiny_cpu_grpo_math"]()
    assert "cpu_problem" not in dry_run_engines(math, 1)
    old = dry_run_engines(apply_overrides(math, ["model.flavor=tiny-qwen-vocab"]), 1)
    text = format_dry_run_engines(old)
    assert "on CPU: NOT RUNNABLE: model.flavor=tiny-qwen-vocab has head_dim 16" in text


def test_rotary_reload_warning_dropped_other_layers_kept():
    import logging

    from qmath_megatron.inference.vllm_worker import (
        RELOAD_LOGGER,
        RotaryReloadFilter,
        quiet_rotary_reload_warning,
    )

    logger = logging.getLogger(RELOAD_LOGGER)
    quiet_rotary_reload_warning()  # again: still one filter
    assert sum(isinstance(f, RotaryReloadFilter) for f in logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for layer in ("RotaryEmbedding", "MRotaryEmbedding", "QKVParallelLinear"):
            logger.warning("%s: Failed to load weights", layer)
        logger.warning("%s: Delayed processing", "RotaryEmbedding")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        "QKVParallelLinear: Failed to load weights",
        "RotaryEmbedding: Delayed processing",
    ]


def test_in_place_updates_of_a_real_cpu_engine_log_no_rotary_warning(tmp_path, capfd):
    """vLLM warns "RotaryEmbedding: Failed to load weights" at every layerwise reload (the
    rotary cos/sin cache is computed, never in a checkpoint); the engine keeps its cache and
    the message is dropped, so a GRPO step's weight sync logs nothing of it."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
    from qmath_megatron.inference.remote import RemoteEngine
    from qmath_megatron.models.flavors import get_flavor
    from qmath_megatron.models.hf_reference import make_random_hf_model

    model = make_random_hf_model(get_flavor("tiny-rl-toy"), tmp_path / "hf", seed=0)
    weights = load_file(str(model / "model.safetensors"))
    engine = RemoteEngine(
        model,
        weight_transfer="qmath_shm",
        skip_tokenizer_init=True,
        seed=0,
        **(CPU_VLLM_DEFAULTS | {"max_model_len": 24}),
    )
    try:
        for version, delta in ((1, 0.01), (2, 0.0)):
            engine.update_weights([(k, v + delta) for k, v in weights.items()], version)
        assert engine.weight_version() == 2
    finally:
        engine.close()
    log = capfd.readouterr().err
    assert log.count("Successfully reset prefix cache") == 2  # both reloads logged here
    assert "Failed to load weights" not in log

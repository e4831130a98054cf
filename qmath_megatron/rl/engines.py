"""Rollout engines of the GRPO trainer: where they run, how weights reach them, and how a
step's rollouts are split over them (one place, kept out of the task).

**Placements** (``rl.placement``), each engine a separate process
(:class:`~qmath_megatron.inference.remote.RemoteEngine`) started by global rank 0 on its
node, all launched at once so their start-ups overlap:

- ``colocated``: the engines share the trainer's GPUs on that node (engine ``i`` on the
  trainer's GPUs ``[i * engine_tp, (i + 1) * engine_tp)``), started with vLLM's sleep mode
  and ``rl.gpu_memory_utilization``. Per step (the weight transport's cycle):
  ``wake_up`` (weights) -> weight sync -> ``wake_up`` (KV cache) -> rollout ->
  ``sleep(level=1)`` before the trainer's forward and backward. On CPU vLLM has no sleep
  mode: the engines run beside the trainer without sleep/wake (logged once).
- ``remote``: the engines run on GPUs of that node the trainer does not use,
  ``rl.engine_gpus`` (``engines * engine_tp`` physical GPU ids, each engine's
  ``CUDA_VISIBLE_DEVICES``). **External engines** (``rl.engine_handles=DIR``): engines on
  other nodes (or anywhere), each started by ``qmath engine serve --handle-dir DIR``
  (:mod:`qmath_megatron.inference.serve`); rank 0 starts nothing, waits for exactly
  ``rl.engines`` handle files in DIR, connects, and on ``close()`` only disconnects. The
  weight-transfer backend is the one the handle files name (``qmath_shm`` needs each
  engine's sender on the engine's node; ``ipc`` is refused: the engine is not the trainer's).

**Weight transfer** (``rl.weight_transfer``; ``auto`` picks): ``qmath_shm`` on CPU (files in
/dev/shm, any placement), ``ipc`` for colocated GPUs (CUDA IPC handles: the engine must sit
on its sender's GPU), ``nccl`` for remote GPUs (NCCL refuses two ranks on one GPU, so not
colocated). One sender per engine (:mod:`qmath_megatron.rl.weight_sync`, the transport of
that name: engine ``i`` belongs to data-parallel replica ``i % dp``, sent by that replica's
TP rank 0 of pipeline stage 0; with ipc, engine ``i`` must sit on its replica's GPUs).

**Start-up** (every rank, in the task's ``setup``): :func:`plan_engines` (rank 0 plans the
layout, every rank checks it against where the ranks run), then :func:`start_engines`
(rank 0 starts or connects the engines, every rank gets their handles).

**Rollouts** (:meth:`RolloutEngines.generate`, the engine protocol's ``generate`` so the TIR
loop uses it too): contiguous chunks of the prompts per engine (:func:`split_prompts`),
generated concurrently (threads: the clients' calls are blocking socket calls), results
concatenated in prompt order. An engine that dies mid-run (or a stale handle file's engine
that never answers) is one ``EngineGoneError`` line (``qmath: error:``) naming it (index,
address, node, handle file) and the last checkpoint, which it leaves intact. Each chunk's
seed is derived from the call's seed and the chunk's offset (:func:`engine_seed`) so that
every prompt gets the request seed it would get from a single engine: the split does not
change what is sampled.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, is_dataclass, replace
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qmath_megatron.inference.engine import CPU_VLLM_DEFAULTS
from qmath_megatron.inference.serve import wait_for_handles
from qmath_megatron.models.flavors import QwenFlavor, get_flavor
from qmath_megatron.rl.reward import get_reward

if TYPE_CHECKING:  # rl/config.py imports this module (its checks)
    from qmath_megatron.rl.config import GRPOJob, RLConfig

# rl/config.py imports this module, and `qmath train grpo --help` imports rl/config.py: the
# project modules that import torch (the engine client, the parallel state, the random HF
# model) are imported by the functions that start the engines, so the help stays light.

T = TypeVar("T")
R = TypeVar("R")

PLACEMENTS = ("colocated", "remote")
TRANSFER_CHOICES = ("auto", "qmath_shm", "ipc", "nccl")
# The head sizes vLLM 0.32's CPU attention backend runs (CPU_ATTN:
# CPUAttentionBackend.get_supported_head_sizes in vllm/v1/attention/backends/cpu_attn.py).
# An engine with another one starts, then fails at its first generate ("Unsupported CPU
# attention configuration"); kept here so the trainer checks it without importing vLLM.
CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# ----------------------------------------------------------------------------- pure rules


def resolve_weight_transfer(requested: str, placement: str, on_gpu: bool) -> str:
    """The weight-transfer backend (``rl.weight_transfer``) for ``placement``; ``auto``:
    ``qmath_shm`` on CPU, ``ipc`` for colocated GPUs, ``nccl`` for remote GPUs. Impossible
    combinations raise ValueError."""
    if placement not in PLACEMENTS:
        raise ValueError(f"rl.placement={placement!r}: one of {', '.join(PLACEMENTS)}")
    if requested not in TRANSFER_CHOICES:
        raise ValueError(f"rl.weight_transfer={requested!r}: one of {', '.join(TRANSFER_CHOICES)}")
    if requested == "auto":
        if not on_gpu:
            return "qmath_shm"
        return "ipc" if placement == "colocated" else "nccl"
    if requested in ("ipc", "nccl") and not on_gpu:
        raise ValueError(
            f"rl.weight_transfer={requested} needs GPUs; use qmath_shm (or auto) on CPU"
        )
    if requested == "ipc" and placement == "remote":
        raise ValueError(
            "rl.weight_transfer=ipc needs rl.placement=colocated: CUDA IPC handles "
            "only reach engines on the trainer's own GPUs (use nccl for remote)"
        )
    if requested == "nccl" and placement == "colocated":
        raise ValueError(
            "rl.weight_transfer=nccl needs rl.placement=remote: NCCL refuses two "
            "ranks on one GPU (use ipc for colocated)"
        )
    return requested


def check_cpu_attention(flavor: QwenFlavor) -> None:
    """ValueError (one line) when engines on CPU cannot run ``flavor``: vLLM's CPU attention
    supports only the head dimensions :data:`CPU_ATTENTION_HEAD_DIMS`."""
    if flavor.head_dim in CPU_ATTENTION_HEAD_DIMS:
        return
    supported = ", ".join(map(str, CPU_ATTENTION_HEAD_DIMS))
    raise ValueError(
        f"model.flavor={flavor.name} has head_dim {flavor.head_dim} (hidden "
        f"{flavor.hidden_size} / {flavor.num_attention_heads} heads), which vLLM's CPU "
        f"attention cannot run (it supports {supported}): on CPU use a flavor such as "
        "tiny-qwen-vocab-hd32 (Qwen vocabulary) or tiny-rl-toy"
    )


def trainer_gpus(local_world_size: int, visible: str | None) -> list[int]:
    """Physical ids of the GPUs the trainer's ranks on this node use (local rank ``r`` on
    the ``r``-th visible device), from ``LOCAL_WORLD_SIZE`` and ``CUDA_VISIBLE_DEVICES``."""
    if not visible:
        return list(range(local_world_size))
    try:
        ids = [int(v) for v in visible.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={visible!r}: engine placement needs integer GPU ids"
        ) from None
    if len(ids) < local_world_size:
        raise ValueError(
            f"{local_world_size} ranks on this node but CUDA_VISIBLE_DEVICES lists {len(ids)} GPUs"
        )
    return ids[:local_world_size]


def assign_gpus(
    placement: str,
    engines: int,
    engine_tp: int,
    trainer: Sequence[int],
    requested: Sequence[int] | None,
) -> list[list[int]]:
    """Each engine's GPUs (its ``CUDA_VISIBLE_DEVICES``). ``trainer``: the physical GPUs of
    the trainer's ranks on the launching node; ``requested``: ``rl.engine_gpus``.

    colocated: engine ``i`` on ``trainer[i * engine_tp : (i + 1) * engine_tp]`` (so
    ``engines * engine_tp`` may not exceed the trainer's GPUs there; ``rl.engine_gpus`` must
    be unset). remote: ``rl.engine_gpus`` lists ``engines * engine_tp`` distinct GPUs, none
    of them the trainer's, taken ``engine_tp`` at a time."""
    need = engines * engine_tp
    if placement == "colocated":
        if requested:
            raise ValueError(
                "rl.engine_gpus is for rl.placement=remote; colocated engines "
                "use the trainer's GPUs"
            )
        if need > len(trainer):
            raise ValueError(
                f"colocated: rl.engines x rl.engine_tp = {need} GPUs, but the trainer "
                f"has {len(trainer)} on the launching node"
            )
        gpus = list(trainer[:need])
    elif placement == "remote":
        if not requested:
            raise ValueError(
                f"rl.placement=remote needs rl.engine_gpus ({need} GPU ids of the "
                "launching node the trainer does not use) or rl.engine_handles; "
                "engines on other nodes are not launched by the trainer: start "
                "them with `qmath engine serve --handle-dir DIR` and set "
                "rl.engine_handles=DIR"
            )
        gpus = [int(g) for g in requested]
        if len(gpus) != need:
            raise ValueError(
                f"rl.engine_gpus lists {len(gpus)} GPUs; rl.engines x rl.engine_tp = {need}"
            )
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"rl.engine_gpus={gpus} repeats a GPU")
        shared = sorted(set(gpus) & set(trainer))
        if shared:
            raise ValueError(
                f"rl.engine_gpus {shared} are the trainer's GPUs; remote engines need "
                "their own (or use rl.placement=colocated)"
            )
    else:
        raise ValueError(f"rl.placement={placement!r}: one of {', '.join(PLACEMENTS)}")
    return [gpus[i * engine_tp : (i + 1) * engine_tp] for i in range(engines)]


def replica_ranks(replica: int, tp: int, cp: int, dp: int, pp: int) -> list[int]:
    """Global ranks of data-parallel replica ``replica`` in Megatron's default rank order
    tp-cp-dp-pp (tp fastest, pp slowest)."""
    return [
        t + tp * (c + cp * (replica + dp * s))
        for s in range(pp)
        for c in range(cp)
        for t in range(tp)
    ]


def check_ipc_engines(
    engine_gpus: Sequence[Sequence[int]], replica_gpus: Sequence[set[int]]
) -> None:
    """CUDA IPC: engine ``i`` must sit on GPUs of its own replica (``i % dp``) on the
    launching node. vLLM's ipc backend opens, on each engine worker's GPU, the handle a
    trainer rank on that same GPU published (by GPU UUID), and the ranks of a replica keep
    their buffers alive only for their own engines' update. ``replica_gpus[i]``: the
    physical GPUs of engine ``i``'s replica on the launching node."""
    for i, (gpus, mine) in enumerate(zip(engine_gpus, replica_gpus, strict=True)):
        outside = [g for g in gpus if g not in mine]
        if outside:
            raise ValueError(
                f"rl.weight_transfer=ipc: engine {i} is on GPUs {list(gpus)} but its data-"
                f"parallel replica ({i} mod DP) has GPUs {sorted(mine)} there; make rl.engines "
                "a multiple of DP with each engine on its replica's GPUs (e.g. rl.engines = DP, "
                "rl.engine_tp = TP x CP x PP), or use qmath_shm"
            )


def listen_address(backend: str, senders_on_launch_node: Sequence[bool]) -> str:
    """Where the engine servers listen. Senders on the launching node reach the engines
    there over the loopback; a sender on another node needs nccl (``qmath_shm`` writes files
    to this node's /dev/shm, ``ipc`` hands out CUDA IPC handles of this node's GPUs), and
    then the servers listen on every interface (calls are authenticated by a per-engine
    key). ``senders_on_launch_node[i]``: engine ``i``'s sender is on the launching node."""
    away = [i for i, local in enumerate(senders_on_launch_node) if not local]
    if not away:
        return "127.0.0.1"
    if backend != "nccl":
        raise ValueError(
            f"engine {away[0]}'s sender (TP rank 0 of replica {away[0]} mod DP) is on another "
            f"node than the engines; {backend} only reaches engines on the sender's node (use "
            "rl.placement=remote with nccl, or fewer engines: engine i is sent to by replica "
            "i mod DP)"
        )
    return "0.0.0.0"


def external_backend(handles: Sequence[Any], requested: str, on_gpu: bool) -> str:
    """The weight-transfer backend of external engines: the one every handle file names
    (they must agree), equal to ``rl.weight_transfer`` unless that is ``auto``, and one this
    trainer can send with (``nccl`` needs GPUs; ``ipc`` is refused: CUDA IPC reaches only
    engines the trainer places on its own GPUs)."""
    backends = sorted({h.backend for h in handles})
    if len(backends) != 1:
        raise ValueError(
            f"the engine handle files name different weight transfers {backends}; "
            "start every engine with the same --weight-transfer"
        )
    backend = backends[0]
    if backend == "ipc":
        raise ValueError(
            "external engines (rl.engine_handles) cannot use ipc: CUDA IPC reaches "
            "only engines on the trainer's own GPUs (use nccl)"
        )
    if requested != "auto" and requested != backend:
        raise ValueError(
            f"rl.weight_transfer={requested} but the engines in the handle files "
            f"were started with {backend} (qmath engine serve --weight-transfer)"
        )
    return resolve_weight_transfer(backend, "remote", on_gpu)


def check_external_senders(
    backend: str, engine_nodes: Sequence[str | None], sender_nodes: Sequence[set[str]]
) -> None:
    """External engines reached by ``qmath_shm`` (files in the sender's /dev/shm) need each
    engine ``i``'s sender(s) (``sender_nodes[i]``: host names) on the engine's node
    (``engine_nodes[i]``, from its handle file); nccl reaches any node."""
    if backend == "nccl":
        return
    for i, (node, senders) in enumerate(zip(engine_nodes, sender_nodes, strict=True)):
        away = sorted(senders - {node})
        if away:
            raise ValueError(
                f"external engine {i} runs on {node} but its sender (TP rank 0 of replica "
                f"{i} mod DP) is on {away[0]}; {backend} only reaches engines on the sender's "
                "node (start the engines with --weight-transfer nccl on GPUs)"
            )


def split_prompts(n_prompts: int, engines: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` chunks of ``n_prompts`` prompts, one per engine, sizes
    differing by at most one (the first engines take the extra prompts); engines beyond
    ``n_prompts`` get empty chunks."""
    if engines < 1 or n_prompts < 0:
        raise ValueError(f"cannot split {n_prompts} prompts over {engines} engines")
    base, extra = divmod(n_prompts, engines)
    out, start = [], 0
    for i in range(engines):
        end = start + base + (i < extra)
        out.append((start, end))
        start = end
    return out


_SEED_MOD = 2**31 - 1  # inference.engine.request_seed's modulus (a prime)
_SEED_MUL = 1_000_003  # and multiplier


def engine_seed(seed: int, offset: int, n: int) -> int:
    """The seed of a chunk that starts at prompt ``offset`` of a call seeded ``seed`` with
    ``n`` samples per prompt, such that its ``j``-th request gets the request seed the
    ``(offset + j)``-th would get in one unsplit call: ``request_seed(s', j * n) ==
    request_seed(seed, (offset + j) * n)`` (``request_seed(s, k) = (s * 1_000_003 + k) mod
    (2^31 - 1)``; solved with the multiplier's inverse modulo the prime)."""
    inverse = pow(_SEED_MUL, -1, _SEED_MOD)
    return (seed + offset * n * inverse) % _SEED_MOD


# ----------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class EngineLayout:
    """Where the rollout engines run. ``gpus``: each engine's physical GPU ids (None on CPU)."""

    placement: str
    engines: int
    engine_tp: int
    backend: str
    gpus: list[list[int]] | None
    sleep: bool  # sleep/wake around the trainer's step (colocated on GPU)
    handles_dir: str | None = None  # external engines: their handle files' directory

    def describe(self) -> str:
        if self.handles_dir is not None:
            return (
                f"remote: {self.engines} external engine(s) from the handle files in "
                f"{self.handles_dir} (qmath engine serve), weights by {self.backend}"
            )
        where = (
            "processes beside the trainer (CPU)"
            if self.gpus is None
            else "; ".join(
                f"engine {i}: GPU {','.join(map(str, g))}" for i, g in enumerate(self.gpus)
            )
        )
        sleep = "sleep/wake around each train step" if self.sleep else "no sleep/wake"
        return (
            f"{self.placement}: {self.engines} engine(s) x TP {self.engine_tp}, weights by "
            f"{self.backend}, {sleep}; {where}"
        )


def plan_layout(rl: Any, on_gpu: bool, trainer: Sequence[int] | None) -> EngineLayout:
    """Validate ``rl`` (the ``RLConfig``) for this machine and place the engines.
    ``trainer``: the trainer's physical GPUs on the launching node (None on CPU). External
    engines (``rl.engine_handles``): the backend is provisional until the handle files are
    read (:func:`external_backend`); no GPUs are assigned."""
    backend = resolve_weight_transfer(rl.weight_transfer, rl.placement, on_gpu)
    if rl.engine_handles:
        return EngineLayout(
            rl.placement, rl.engines, rl.engine_tp, backend, None, False, str(rl.engine_handles)
        )
    if not on_gpu:
        return EngineLayout(rl.placement, rl.engines, rl.engine_tp, backend, None, False)
    gpus = assign_gpus(rl.placement, rl.engines, rl.engine_tp, trainer or [], rl.engine_gpus)
    return EngineLayout(
        rl.placement, rl.engines, rl.engine_tp, backend, gpus, rl.placement == "colocated"
    )


def dry_run_engines(job: Any, world: int, gpus_per_node: int = 8) -> dict[str, Any]:
    """The engine layout ``--dry-run`` prints for a GPU run of ``world`` trainer ranks (the
    launching node: ``min(world, gpus_per_node)`` trainer GPUs); problems are reported, not
    raised, so the rest of the plan still prints."""
    rl, p = job.rl, job.parallel
    info: dict[str, Any] = {
        "placement": rl.placement,
        "engines": rl.engines,
        "engine_tp": rl.engine_tp,
        "engine_gpus_total": rl.engines * rl.engine_tp,
    }
    try:  # the same plan run on CPU (tests, the tiny recipes): vLLM's CPU attention
        check_cpu_attention(get_flavor(job.model.flavor))
    except ValueError as e:
        info["cpu_problem"] = str(e)
    try:
        layout = plan_layout(rl, True, list(range(min(world, gpus_per_node))))
        if layout.handles_dir is not None:
            info.update(
                backend=layout.backend, handles_dir=layout.handles_dir, describe=layout.describe()
            )
            return info
        info.update(
            backend=layout.backend,
            sleep_wake=layout.sleep,
            gpus=layout.gpus,
            gpu_memory_utilization=rl.gpu_memory_utilization,
        )
        if layout.backend == "ipc":
            dp = p.data_parallel_size(world)
            node = min(world, gpus_per_node)
            check_ipc_engines(
                layout.gpus,
                [
                    {r for r in replica_ranks(i % dp, p.tp, p.cp, dp, p.pp) if r < node}
                    for i in range(rl.engines)
                ],
            )
        info["describe"] = layout.describe()
    except ValueError as e:
        info["problem"] = str(e)
    return info


def format_dry_run_engines(info: dict[str, Any]) -> str:
    head = (
        f"rollout engines: {info['placement']}, {info['engines']} x engine TP {info['engine_tp']} "
        f"({info['engine_gpus_total']} GPUs)"
    )
    cpu = (
        f"\n  on CPU: NOT RUNNABLE: {info['cpu_problem']}"
        if "cpu_problem" in info
        else "\n  on CPU: weights by qmath_shm, engines as processes beside the trainer "
        "(no sleep/wake)"
    )
    if "problem" in info:
        return f"{head}; NOT RUNNABLE AS IS on GPUs: {info['problem']}{cpu}"
    if "handles_dir" in info:
        return (
            f"{head}, external (started by `qmath engine serve --handle-dir "
            f"{info['handles_dir']}`, one per engine), weights by {info['backend']} (the "
            f"handle files' backend must match)\n  rank 0 waits for {info['engines']} handle "
            f"files in {info['handles_dir']} (rl.engine_handles=DIR overrides it)"
        )
    gpus = "; ".join(
        f"engine {i}: GPUs {','.join(map(str, g))}" for i, g in enumerate(info["gpus"])
    )
    sleep = "sleep/wake around each train step" if info["sleep_wake"] else "no sleep/wake"
    sleep += f", {info['gpu_memory_utilization']:.0%} of each engine GPU while awake"
    return f"{head}, weights by {info['backend']}, {sleep}\n  {gpus}{cpu}"


def find_external(
    layout: EngineLayout, rl: Any, on_gpu: bool, **wait: Any
) -> tuple[EngineLayout, list[Any]]:
    """Rank 0, external engines: wait for exactly ``rl.engines`` handle files in
    ``layout.handles_dir`` (progress every ~30 s, a clear error on timeout), then take the
    backend from them. Returns the final layout and the handles (``RemoteHandle``)."""
    assert layout.handles_dir is not None
    note(
        f"waiting up to {rl.engine_handles_timeout_s:.0f} s for {rl.engines} engine handle "
        f"files in {layout.handles_dir} (qmath engine serve --handle-dir)"
    )
    handles = wait_for_handles(
        layout.handles_dir, rl.engines, rl.engine_handles_timeout_s, log=note, **wait
    )
    backend = external_backend(handles, rl.weight_transfer, on_gpu)
    for i, h in enumerate(handles):
        note(
            f"external engine {i}: {h.host}:{h.port} on {h.node} ({h.workers} worker(s), "
            f"{h.backend}, model {h.model_dir})"
        )
    return replace(layout, backend=backend), handles


# ----------------------------------------------------------------------------- the engines


def fan_out(fn: Callable[[T], R], items: Sequence[T]) -> list[R | BaseException]:
    """``fn(item)`` for every item at once, one thread each (engine calls block on a socket
    or on a process start-up, so threads overlap them); one item runs in the caller's
    thread. Returns the results in item order, with the exception a call raised in its
    place: every call has ended when it returns, and the caller decides what a failure
    means (close the others, name the engine)."""
    results: list[Any] = [None] * len(items)

    def run(k: int) -> None:
        try:
            results[k] = fn(items[k])
        except BaseException as e:  # handed to the caller, after every call ended
            results[k] = e

    if len(items) == 1:
        run(0)
    else:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


class RolloutEngines:
    """The engines of a run, on global rank 0 (which owns their processes and a client per
    engine). Speaks the engine protocol's ``generate`` and ``tokenizer``, so the rollout
    code (CoT and the TIR loop) treats the engines as one."""

    def __init__(self, layout: EngineLayout, engines: list[Any]):
        self.layout, self._engines = layout, engines
        for i, e in enumerate(engines):  # errors name the engine by its place in the run
            handle = e.handle
            if is_dataclass(handle) and getattr(handle, "index", i) != i:
                e.handle = _indexed(handle, i)
        self.handles = [e.handle for e in engines]
        self.used: set[int] = set()  # engines that generated since the last reset_usage()

    @classmethod
    def start(
        cls,
        layout: EngineLayout,
        model_dir: str,
        engine_kwargs: dict[str, Any],
        *,
        factory: Callable[..., Any] | None = None,
    ) -> RolloutEngines:
        """Launch every engine at once (each constructor starts a process and waits for it;
        one thread each, so the start-ups overlap); on any failure the others are closed."""
        if factory is None:  # imports torch (see the note at the top)
            from qmath_megatron.inference.remote import RemoteEngine as factory
        kwargs = dict(engine_kwargs)
        if layout.gpus is not None:
            kwargs["tensor_parallel_size"] = layout.engine_tp
            if layout.sleep:
                kwargs["enable_sleep_mode"] = True

        def launch(i: int) -> Any:
            env = None
            if layout.gpus is not None:
                env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, layout.gpus[i]))}
            return factory(model_dir, weight_transfer=layout.backend, env=env, **kwargs)

        results = fan_out(launch, range(layout.engines))
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    r.close()
            raise RuntimeError(
                f"{len(errors)} of {layout.engines} rollout engines did not start: {errors[0]}"
            ) from errors[0]
        return cls(layout, results)

    @classmethod
    def connect(cls, layout: EngineLayout, handles: Sequence[Any]) -> RolloutEngines:
        """Clients of external engines (``qmath engine serve``): ``close()`` disconnects and
        leaves the engines running. A handle that does not answer raises, naming it."""
        from qmath_megatron.inference.remote import EngineGoneError  # torch (see the top)

        clients: list[Any] = []
        try:
            for i, h in enumerate(handles):
                h = _indexed(h, i)
                try:
                    clients.append(h.connect())
                except AuthenticationError as e:
                    raise EngineGoneError(
                        f"{_external(h, i)} refuses the handle file's auth key ({e}): the "
                        "file is stale, left by an earlier engine on that port; remove it, "
                        f"or restart `qmath engine serve --handle-dir {layout.handles_dir}`"
                    ) from e
                except (OSError, EOFError) as e:
                    cause = e.__cause__ if isinstance(e, EngineGoneError) and e.__cause__ else e
                    raise EngineGoneError(
                        f"{_external(h, i)} does not answer ({_why(cause)}): it is not "
                        "running, and its handle file is stale (an engine killed with SIGKILL "
                        "leaves it); remove the file, or restart `qmath engine serve "
                        f"--handle-dir {layout.handles_dir}`"
                    ) from e
        except BaseException:
            for c in clients:
                c.close()
            raise
        return cls(layout, clients)

    def __len__(self) -> int:
        return len(self._engines)

    @property
    def tokenizer(self) -> Any:
        return self._engines[0].tokenizer

    def reset_usage(self) -> None:
        self.used = set()

    def generate(self, prompts: Sequence[Any], params: Any) -> list[list[Any]]:
        """Split ``prompts`` into contiguous chunks, one per engine, generate concurrently,
        return the groups in prompt order (see :func:`engine_seed` for the seeds)."""
        chunks = [
            (i, a, b) for i, (a, b) in enumerate(split_prompts(len(prompts), len(self))) if b > a
        ]

        def run(chunk: tuple[int, int, int]) -> list[list[Any]]:
            i, a, b = chunk
            chunk_params = replace(params, seed=engine_seed(params.seed, a, params.n))
            return self._engines[i].generate(list(prompts[a:b]), chunk_params)

        out = fan_out(run, chunks)
        groups: list[list[Any]] = []
        for (i, a, b), res in zip(chunks, out, strict=True):
            if _is_gone(res):  # one line that names the engine and how to resume
                raise res
            if isinstance(res, BaseException):
                raise RuntimeError(f"rollout engine {i}: {res}") from res
            if len(res) != b - a:
                raise RuntimeError(
                    f"rollout engine {i} returned {len(res)} groups for {b - a} prompts"
                )
            groups.extend(res)
            self.used.add(i)
        return groups

    def weight_versions(self) -> list[int]:
        return [e.weight_version() for e in self._engines]

    def _each(self, fn: Callable[[Any], None]) -> None:
        """``fn`` on every engine concurrently (sleep/wake move GBs per engine)."""
        errors = [r for r in fan_out(fn, self._engines) if isinstance(r, BaseException)]
        for e in errors:
            if _is_gone(e):
                raise e
        if errors:
            raise RuntimeError(f"rollout engines: {errors[0]}") from errors[0]

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Colocated GPU engines: restore ``tags`` (``["weights"]`` before the sync,
        ``["kv_cache"]`` before the rollout; None: everything)."""
        if self.layout.sleep:
            self._each(lambda e: e.wake_up(tags=tags))

    def sleep(self, level: int = 1) -> None:
        """Colocated GPU engines: free their GPU memory for the trainer's step (level 1:
        weights offloaded to host memory, KV cache dropped)."""
        if self.layout.sleep:
            self._each(lambda e: e.sleep(level=level))

    def close(self) -> None:
        for e in self._engines:
            e.close()
        self._engines = []


def _indexed(handle: Any, index: int) -> Any:
    """``handle`` carrying its engine's index (a ``RemoteHandle``; others unchanged)."""
    if is_dataclass(handle) and hasattr(handle, "index"):
        return replace(handle, index=index)
    return handle


def _external(handle: Any, index: int) -> str:
    made = getattr(handle, "handle_file", None)
    made = f", handle file {made}" if made else ""
    return (
        f"the external engine at {handle.host}:{handle.port} (engine {index}, node "
        f"{handle.node}{made})"
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _is_gone(exc: Any) -> bool:
    """An engine's process is gone (``EngineGoneError``; module already loaded when the
    engines are)."""
    remote = sys.modules.get("qmath_megatron.inference.remote")
    return remote is not None and isinstance(exc, remote.EngineGoneError)


def last_checkpoint(root: str | None) -> str | None:
    """The last published checkpoint under ``root`` (``checkpoint.save``), or None."""
    if not root:
        return None
    from qmath_megatron.training.checkpointing import iteration_dirname, latest_iteration

    try:
        it = latest_iteration(root)
    except (OSError, ValueError):
        return None
    return None if it is None else str(Path(root) / iteration_dirname(it))


# ----------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class EnginePlan:
    """What every rank knows before the engines start: where they run (``layout``), the
    address their servers listen on (``listen``; None for external engines, which listen
    where ``qmath engine serve`` put them) and, on rank 0, the external engines' handles."""

    layout: EngineLayout
    listen: str | None
    external: list[Any] | None = None


def plan_engines(rl: RLConfig, is_main: bool) -> EnginePlan:
    """Every rank (a collective): the engine layout rank 0 planned, checked against where
    the ranks run (senders on other nodes need nccl; with ipc each engine sits on its
    replica's GPUs). Errors raise on every rank."""
    import torch
    import torch.distributed as dist

    from qmath_megatron.parallel.runtime import parallel_ranks  # imports torch (see the top)

    on_gpu = torch.cuda.is_available()
    trainer, my_gpu = local_gpu_view()
    external: list[Any] | None = None
    box: list[Any] = [None]
    if is_main:
        try:
            layout = plan_layout(rl, on_gpu, trainer)
            if layout.handles_dir is not None:  # started by `qmath engine serve`
                layout, external = find_external(layout, rl, on_gpu)
            box[0] = (layout, [h.node for h in external or []])
        except ValueError as e:
            box[0] = str(e)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ValueError(box[0])
    layout, engine_nodes = box[0]
    # Where every rank runs: engines are reached from their senders' nodes only by nccl.
    r = parallel_ranks()
    me = (r["dp_rank"], r["tp_rank"] == 0 and r["pp_rank"] == 0, socket.gethostname(), my_gpu)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    host0, dp = everyone[0][2], r["dp_size"]
    listen: str | None = None
    if layout.handles_dir is not None:  # external engines: each sender reaches its engine
        check_external_senders(
            layout.backend,
            engine_nodes,
            [
                {host for d, sender, host, _ in everyone if sender and d == i % dp}
                for i in range(layout.engines)
            ],
        )
    else:
        listen = listen_address(
            layout.backend,
            [
                all(host == host0 for d, sender, host, _ in everyone if sender and d == i % dp)
                for i in range(layout.engines)
            ],
        )
    if layout.backend == "ipc":
        check_ipc_engines(
            layout.gpus,
            [
                {gpu for d, _, host, gpu in everyone if d == i % dp and host == host0}
                for i in range(layout.engines)
            ],
        )
    if is_main:
        note(layout.describe())
        if layout.placement == "colocated" and layout.gpus is None:
            note(
                "colocated placement on CPU: vLLM has no sleep mode here, so the "
                "engines run beside the trainer without sleep/wake"
            )
    return EnginePlan(layout, listen, external)


def open_engines(plan: EnginePlan, job: GRPOJob, flavor: QwenFlavor) -> RolloutEngines:
    """Rank 0: start ``rl.engines`` engine processes, or connect to the external ones
    (``rl.engine_handles``). Engines that sleep while the trainer steps (colocated, GPU)
    start asleep: the first step wakes them."""
    import torch

    from qmath_megatron.models.hf_reference import make_random_hf_model  # torch (see the top)

    layout, rl = plan.layout, job.rl
    if layout.handles_dir is not None:  # external engines: connect; close() leaves them up
        return RolloutEngines.connect(layout, plan.external or [])
    model_dir = rl.engine_model
    kwargs: dict[str, Any] = {"seed": job.train.seed}
    if model_dir is None:
        if get_reward(rl.task).problems:
            raise ValueError("set rl.engine_model (the SFT model's HF directory)")
        if not job.checkpoint.save:  # rl/prepare.py refuses this before any engine starts
            raise ValueError("rl.engine_model unset: the random start weights need checkpoint.save")
        # A token-prompt task (the toy one) needs no tokenizer; the engines start from any
        # weights of the architecture (the first sync replaces them).
        dtype = torch.float32 if layout.gpus is None else job.precision.torch_dtype
        model_dir = make_random_hf_model(
            flavor, Path(job.checkpoint.save) / "engine_init", dtype=dtype
        )
        kwargs["skip_tokenizer_init"] = True
    if layout.gpus is None:
        kwargs.update(CPU_VLLM_DEFAULTS, max_model_len=job.model.seq_length + 8)
    else:  # the trainer's precision: the engine samples what the trainer computes
        kwargs.update(
            gpu_memory_utilization=rl.gpu_memory_utilization,
            dtype=str(job.precision.torch_dtype).removeprefix("torch."),
        )
    if plan.listen != "127.0.0.1":  # senders on other nodes connect (nccl)
        kwargs["host"] = plan.listen
    engines = RolloutEngines.start(layout, str(model_dir), kwargs)
    engines.sleep(level=1)  # colocated GPU: asleep until the first step wakes them
    return engines


def start_engines(
    plan: EnginePlan, job: GRPOJob, flavor: QwenFlavor, is_main: bool
) -> tuple[RolloutEngines | None, list[Any]]:
    """Every rank (a collective): rank 0 opens the engines (:func:`open_engines`), every
    rank gets their handles (what its weight transport connects to). Returns (the engines
    on rank 0, None elsewhere; the handles). A failure on rank 0 raises on every rank."""
    import torch.distributed as dist

    from qmath_megatron.inference.remote import set_checkpoint_hint  # torch (see the top)

    # An engine that dies mid-run is reported on any rank naming the last checkpoint.
    save = job.checkpoint.save
    set_checkpoint_hint(None if save is None else lambda: last_checkpoint(save))
    engines = None
    box: list[Any] = [None]
    if is_main:
        try:
            engines = open_engines(plan, job, flavor)
            box[0] = engines.handles
        except Exception as e:  # the other ranks must not wait for handles forever
            box[0] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise RuntimeError(f"rank 0 could not start the rollout engines: {box[0]}")
    return engines, box[0]


def local_gpu_view() -> tuple[list[int] | None, int | None]:
    """(the trainer's physical GPUs on this node, this rank's physical GPU); (None, None)
    without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    mine = torch.cuda.current_device()
    ids = trainer_gpus(max(local_world, mine + 1), visible)
    return ids[:local_world], ids[mine]


def note(message: str) -> None:
    """One line in the trainer's log (rank 0 calls it)."""
    print(f"rl engines: {message}", file=sys.stderr, flush=True)

"""Rollout engines that are gone: one `qmath: error:` line, never a traceback or a hang.

An external engine (``qmath engine serve``) that dies mid-run makes the trainer's next call
fail naming the engine (index, address, node, handle file), saying the checkpoints are intact
(the last one named) and how to resume. A handle file left by an engine that is not running
(killed with SIGKILL) is refused naming the file. The real client code runs against a
stand-in engine server (no vLLM): a process serving the same socket protocol, killed -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qmath_megatron.inference.engine import SamplingParams
from qmath_megatron.inference.remote import (
    EngineGoneError,
    RemoteHandle,
    set_checkpoint_hint,
)
from qmath_megatron.inference.serve import (
    read_handle_file,
    wait_for_handles,
    write_handle_file,
)
from qmath_megatron.rl.engines import EngineLayout, RolloutEngines, last_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# A stand-in engine server: the remote engine's socket protocol and accept loop, no vLLM.
SERVER = """
import sys
from multiprocessing.connection import Listener
from qmath_megatron.inference.remote import accept_forever

listener = Listener(("127.0.0.1", 0), authkey=bytes.fromhex(sys.argv[1]))

def serve(conn):
    with conn:
        while True:
            try:
                method, args = conn.recv()
            except (EOFError, OSError):
                return
            conn.send((True, 7 if method == "weight_version" else [[] for _ in args[0]]))

print(listener.address[1], flush=True)
accept_forever(listener, serve)
"""


@pytest.fixture
def engine_server():
    """(the server process, its port, its auth key); killed at the end."""
    key = secrets.token_bytes(16)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, key.hex()], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())
        yield proc, port, key
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(autouse=True)
def no_checkpoint_hint():
    yield
    set_checkpoint_hint(None)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _handle_file(directory: Path, port: int, key: bytes, **record) -> Path:
    h = RemoteHandle("127.0.0.1", port, key, "/m", "qmath_shm", 1 << 20, 1, socket.gethostname())
    path = write_handle_file(directory, h)
    if record:
        path.write_text(json.dumps({**json.loads(path.read_text()), **record}))
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_engine_killed_mid_run_is_one_line_naming_it(engine_server, tmp_path):
    proc, port, key = engine_server
    handles = tmp_path / "engines"
    handles.mkdir()
    path = _handle_file(handles, port, key)
    root = tmp_path / "ck"
    (root / "iter_0000004").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("4")
    set_checkpoint_hint(lambda: last_checkpoint(str(root)))

    layout = EngineLayout("remote", 1, 1, "qmath_shm", None, False, str(handles))
    engines = RolloutEngines.connect(layout, wait_for_handles(handles, 1, 10))
    assert engines.weight_versions() == [7]
    assert engines.handles[0].index == 0 and engines.handles[0].handle_file == str(path)
    _kill(proc)  # the engine process dies between two steps
    with pytest.raises(EngineGoneError) as err:
        engines.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2, seed=0))
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ChildProcessError)
    assert message.startswith(
        f"rollout engine 0 at 127.0.0.1:{port} on {socket.gethostname()} (handle file {path}) "
        "is gone ("
    )
    assert "during generate" in message
    assert "The checkpoints saved so far are intact" in message
    assert f"restart it (`qmath engine serve --handle-dir {handles}`)" in message
    assert f"rerun the same command to resume from the last one ({root / 'iter_0000004'})" in (
        message
    )
    engines.close()


def test_a_sender_ranks_client_names_the_engine_too(engine_server, tmp_path):
    """Weight-sync senders on other ranks connect from the broadcast handles (which carry
    the engine's index and handle file) and fail the same way."""
    proc, port, key = engine_server
    handle = RemoteHandle(
        "127.0.0.1", port, key, "/m", "qmath_shm", node="n2", index=3, handle_file="/d/e.json"
    )
    client = handle.connect()
    assert client.weight_version() == 7
    _kill(proc)
    with pytest.raises(EngineGoneError, match=r"rollout engine 3 at 127\.0\.0\.1:\d+ on n2 "):
        client.weight_version()
    with pytest.raises(EngineGoneError, match="during finish_weight_update"):
        client.finish_weight_update("1")


def test_the_command_line_prints_it_in_one_line(monkeypatch, capsys):
    from qmath_megatron import cli
    from qmath_megatron.inference import serve

    handle = RemoteHandle("10.0.0.5", 4000, b"k", "/m", "nccl", index=1, handle_file="/d/e.json")

    def run(args):
        raise handle.gone("connection reset by peer", "generate")

    monkeypatch.setattr(serve, "_run", run)
    rc = cli.main(["engine", "serve", "--model", "/m", "--handle-dir", "/d"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(
        "qmath: error: rollout engine 1 at 10.0.0.5:4000 (handle file /d/e.json) is gone "
        "(connection reset by peer) during generate"
    )


def test_a_handle_file_of_a_dead_engine_is_refused_naming_it(tmp_path):
    dead = _dead_pid()
    path = _handle_file(tmp_path, 4000, b"k" * 16, pid=dead)
    assert read_handle_file(path).pid == dead
    with pytest.raises(ValueError) as err:
        wait_for_handles(tmp_path, 1, 10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"engine handle file {path}: the engine is not running")
    assert f"process {dead} is not running" in message
    assert f"remove the file, or restart `qmath engine serve --handle-dir {tmp_path}`" in message
    _handle_file(tmp_path, 4001, b"k" * 16)  # a live one (this process) too many
    with pytest.raises(ValueError, match=rf"remove the stale ones \({path.name} not running\)"):
        wait_for_handles(tmp_path, 1, 10)


def test_a_stale_handle_file_of_another_node_fails_at_connect_naming_it(tmp_path):
    """Its pid cannot be checked from here: connecting is refused, and says so in one line
    (the engine address answers nothing) instead of a traceback."""
    path = _handle_file(tmp_path, _closed_port(), b"k" * 16, node="elsewhere")
    handles = wait_for_handles(tmp_path, 1, 10)  # another node's file: not judged by pid
    layout = EngineLayout("remote", 1, 1, "qmath_shm", None, False, str(tmp_path))
    with pytest.raises(EngineGoneError) as err:
        RolloutEngines.connect(layout, handles)
    message = str(err.value)
    assert "\n" not in message
    assert f"(engine 0, node elsewhere, handle file {path}) does not answer (connection " in message
    assert "it is not running" in message
    assert f"remove the file, or restart `qmath engine serve --handle-dir {tmp_path}`" in message


def test_the_engine_server_survives_a_port_probe(engine_server):
    """A bare TCP connection that closes (a port probe, a client that went away) during
    the auth handshake used to end the server's accept loop, and the engine with it."""
    proc, port, key = engine_server
    for _ in range(3):
        with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=5)):
            pass
    client = RemoteHandle("127.0.0.1", port, key, "/m", "qmath_shm").connect()
    assert client.weight_version() == 7 and proc.poll() is None
    client.close()


def test_a_wrong_key_is_not_taken_for_a_dead_engine(engine_server, tmp_path):
    from multiprocessing import AuthenticationError

    proc, port, key = engine_server
    with pytest.raises(AuthenticationError):
        RemoteHandle("127.0.0.1", port, os.urandom(16), "/m", "qmath_shm").connect()
    assert proc.poll() is None

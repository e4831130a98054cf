"""The sandboxed executor: limits, isolation, cleanup, the pool, and the hostile corpus."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from qmath_megatron.cli import main
from qmath_megatron.sandbox import (
    SandboxConfig,
    SandboxExecutor,
    SandboxUnavailable,
    detect_isolation,
)
from qmath_megatron.sandbox.executor import classify, normalize_returncode
from qmath_megatron.sandbox.hostile import SELF_TEST_CONFIG, self_test
from qmath_megatron.sandbox.isolation import (
    CHAIN_PROCESSES,
    Exposure,
    Limits,
    Plan,
    Tools,
    build_command,
    plan_exposures,
)
from qmath_megatron.sandbox.procs import cmdline_of, iter_processes
from qmath_megatron.sandbox.uids import lease_uids


@pytest.fixture(scope="module")
def executor():
    with SandboxExecutor(SandboxConfig(timeout_s=10, workers=4)) as ex:
        yield ex


# --- configuration and pure helpers -----------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_s", 0, "timeout_s must be > 0"),
        ("timeout_s", float("inf"), "finite"),
        ("memory_mb", 8, "memory_mb must be >= 32"),
        ("workers", 0, "workers must be >= 1"),
        ("max_processes", 1.5, "max_processes must be an integer"),
        ("isolation", "docker", "isolation must be one of auto, bwrap, rlimits"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SandboxConfig(**{field: value})


def test_signal_exit_codes_are_normalized_and_classified():
    bwrap = Plan("bwrap", Tools.find(), False, ())
    plain = Plan("rlimits", Tools.find(), False, ())
    assert normalize_returncode(137, bwrap) == -9  # 128 + SIGKILL from bwrap's monitor
    assert normalize_returncode(137, plain) == 137  # the program's own exit code
    assert classify(None, -9, "") == "killed"
    assert classify(None, 1, "Traceback...\nMemoryError\n") == "memory"
    assert classify("timeout", -9, "MemoryError") == "timeout"
    assert classify(None, 2, "") == "error" and classify(None, 0, "x") == "ok"


def test_command_drops_uid_and_limits_processes(tmp_path):
    tools = Tools.find()
    if tools.bwrap is None:
        tools = dataclasses.replace(tools, bwrap="/usr/bin/bwrap")
    plan = Plan("bwrap", tools, True, ("--pid", "--fork", "--kill-child"))
    config = SandboxConfig(max_processes=7)
    limits = Limits.from_config(config, config.max_processes + CHAIN_PROCESSES)
    cmd = build_command(plan, sys.executable, str(tmp_path), 61234, limits, [])
    assert f"--nproc={7 + CHAIN_PROCESSES}" in cmd and "--core=0" in cmd
    assert cmd.index("--reuid=61234") < cmd.index(tools.bwrap)  # bwrap runs unprivileged
    assert {"--unshare-all", "--clearenv", "--die-with-parent"} <= set(cmd)
    assert cmd[-4:] == [sys.executable, "-I", "-B", str(tmp_path / "main.py")]
    with pytest.raises(ValueError, match="no uid"):
        build_command(plan, sys.executable, str(tmp_path), None, limits, [])


def test_unsearchable_interpreter_dirs_are_exposed():
    # Not under tmp_path: pytest's base directory is itself 0700 and would be the blocker.
    base = tempfile.mkdtemp(prefix="qmath-expose-test-")
    os.chmod(base, 0o755)
    private = Path(base) / "home"
    prefix = private / "pyenv" / "3.11"
    (prefix / "lib").mkdir(parents=True)
    private.chmod(0o700)
    try:
        info = {k: str(prefix) for k in ("prefix", "base_prefix", "exec_prefix")}
        info |= {"base_exec_prefix": str(prefix), "path": [str(prefix / "lib")]}
        exposures = plan_exposures(str(prefix / "python"), info)
    finally:
        private.chmod(0o755)
        shutil.rmtree(base)
    # One tmpfs over the blocking directory, the prefix (not its subdirectory) bound back.
    assert exposures == (Exposure(str(private), (str(prefix),)),)


# --- running programs -----------------------------------------------------------------


def test_ok_run_returns_stdout(executor):
    result = executor.run("import numpy, sympy\nprint(sympy.Integer(6) * 7)\n")
    assert result.status == "ok", result.stderr
    assert result.stdout == "42\n" and result.returncode == 0
    assert result.isolation == executor.isolation.backend


def test_error_run_returns_traceback(executor):
    result = executor.run("def f():\n    raise ValueError('boom')\nf()\n")
    assert result.status == "error" and result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr


def test_killed_by_signal(executor):
    result = executor.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert (result.status, result.returncode) == ("killed", -9)


def test_timeout_ends_within_the_limit():
    with SandboxExecutor(SandboxConfig(timeout_s=2, workers=1)) as ex:
        start = time.monotonic()
        result = ex.run("print('started', flush=True)\nwhile True:\n    pass\n")
        elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert result.stdout == "started\n"  # output before the kill is kept
    assert 2 <= result.seconds < 10 and elapsed < 10


def test_memory_limit():
    with SandboxExecutor(SandboxConfig(memory_mb=256, workers=1)) as ex:
        result = ex.run("block = bytes(512 * 2**20)\nprint('allocated')\n")
        small = ex.run("block = bytes(16 * 2**20)\nprint('allocated')\n")
    assert result.status == "memory" and "MemoryError" in result.stderr
    assert "allocated" not in result.stdout
    assert small.status == "ok"


def test_output_is_truncated_and_a_flood_is_killed():
    with SandboxExecutor(SandboxConfig(max_output_bytes=1000, timeout_s=20, workers=1)) as ex:
        big = ex.run("import sys\nsys.stdout.write('a' * 5000)\nsys.stderr.write('b' * 50)\n")
        flood = ex.run("while True:\n    print('x' * 1000)\n")
    assert big.status == "ok" and big.stdout == "a" * 1000 and big.stdout_truncated
    assert big.stderr == "b" * 50 and not big.stderr_truncated
    assert flood.status == "output_limit" and flood.seconds < 10
    assert len(flood.stdout) == 1000 and flood.stdout_truncated


def test_environment_is_scrubbed(executor, monkeypatch):
    token = uuid.uuid4().hex
    monkeypatch.setenv("QMATH_SECRET_TOKEN", token)
    result = executor.run("import json, os\nprint(json.dumps(dict(os.environ)))\n")
    env = json.loads(result.stdout)
    assert token not in result.stdout and "QMATH_SECRET_TOKEN" not in env
    assert env["HOME"] == result.workdir and env["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    expected = {"PATH", "HOME", "LANG", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    expected |= {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND"}
    assert set(env) - {"PWD"} == expected


def test_workdir_is_fresh_and_deleted(executor):
    code = (
        "import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('out.txt', 'w').write('x')\n"
    )
    first, second = executor.run(code), executor.run(code)
    cwd, listing = first.stdout.split(" ", 1)
    assert cwd == first.workdir and listing.strip() == "['main.py']"
    assert first.workdir != second.workdir  # a new directory per call
    assert not os.path.exists(first.workdir) and not os.path.exists(second.workdir)


def test_detached_children_are_killed(executor):
    nonce = uuid.uuid4().hex
    code = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, '-c',
                         'import time; time.sleep(60)', {nonce!r}])
            os._exit(0)
        print('detached')
    """)
    result = executor.run(code)
    assert result.status == "ok"
    time.sleep(0.2)
    assert not [p.pid for p in iter_processes() if nonce in cmdline_of(p.pid)]
    if result.uid is not None:
        assert not [p.pid for p in iter_processes() if result.uid in p.uids[:3]]


def test_closed_executor_refuses_calls():
    ex = SandboxExecutor(SandboxConfig(workers=1))
    workspace = ex._workspace.base
    ex.close()
    assert not os.path.exists(workspace)
    with pytest.raises(RuntimeError, match="closed"):
        ex.run("print(1)")


def test_run_many_keeps_order_and_runs_in_parallel(executor):
    codes = [f"import time\ntime.sleep(1)\nprint({i})\n" for i in range(4)]
    start = time.monotonic()
    results = executor.run_many(codes)
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert elapsed < 3, f"4 x sleep(1) on 4 workers took {elapsed:.1f}s"
    if executor.isolation.uid_isolated:
        assert len({r.uid for r in results}) == 4  # one uid per slot


def test_uid_leases_are_distinct_across_processes():
    # A range of its own, so that executors running meanwhile cannot take the uids.
    first, span = 63000, 100
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from qmath_megatron.sandbox.uids import lease_uids\n"
            f"leases = lease_uids(3, {first}, {span})\n"
            "print(*[l.uid for l in leases], flush=True)\ninput()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        theirs = {int(u) for u in holder.stdout.readline().split()}
        ours = lease_uids(3, first, span)
        try:
            assert len(theirs) == 3 and theirs.isdisjoint({lease.uid for lease in ours})
        finally:
            for lease in ours:
                lease.release()
    finally:
        holder.communicate("\n", timeout=30)
    # The holder exited: the kernel dropped its locks and the uids can be leased again.
    again = lease_uids(6, first, span)
    try:
        assert theirs <= {lease.uid for lease in again}
    finally:
        for lease in again:
            lease.release()


# --- isolation levels -----------------------------------------------------------------


def test_detected_isolation_is_consistent():
    report = detect_isolation(SandboxConfig())
    assert report.backend in ("bwrap", "rlimits")
    if report.strong:
        assert report.filesystem_isolated and report.network_isolated and report.pid_namespace
    else:
        assert report.warnings
    if shutil.which("bwrap") and os.geteuid() == 0:
        assert report.backend == "bwrap" and report.strong and report.uid_isolated


def test_weak_isolation_warns_and_can_be_refused(capsys):
    weak = SandboxConfig(isolation="rlimits", workers=1)
    with SandboxExecutor(weak) as ex:
        assert ex.isolation.backend == "rlimits" and not ex.isolation.strong
        assert ex.run("print('weak ok')").stdout == "weak ok\n"
    assert "WARNING" in capsys.readouterr().err
    with pytest.raises(SandboxUnavailable, match="require_strong"):
        SandboxExecutor(dataclasses.replace(weak, require_strong=True))


def test_hostile_corpus_strongest_backend_via_self_test(capsys):
    if shutil.which("bwrap") is None:
        # The self-test says so and fails, rather than passing on weaker isolation.
        assert main(["exec", "--self-test", "--isolation", "bwrap"]) == 1
        assert "bubblewrap is not installed" in capsys.readouterr().err
        return
    code = main(["exec", "--self-test", "--isolation", "bwrap"])
    report = json.loads(capsys.readouterr().out)
    failures = [p for p in report["programs"] if p["escaped"] or p["hang"]]
    assert (report["escapes"], report["hangs"]) == (0, 0), failures
    assert code == 0 and report["isolation"]["backend"] == "bwrap"
    assert report["attempts"] >= 12


def test_hostile_corpus_weak_backend_keeps_its_claims():
    report = self_test(dataclasses.replace(SELF_TEST_CONFIG, isolation="rlimits"))
    assert report["isolation"]["backend"] == "rlimits"
    assert report["hangs"] == 0, [p for p in report["programs"] if p["hang"]]
    broken = [p for p in report["programs"] if p["guaranteed"] and p["escaped"]]
    assert not broken, broken
    claims = report["isolation"]
    by_name = {p["name"]: p for p in report["programs"]}
    if claims["uid_isolated"]:
        assert not by_name["fork_bomb"]["escaped"] and not by_name["detached_daemon"]["escaped"]
        assert not by_name["write_outside"]["escaped"]
    if claims["network_isolated"]:
        assert not by_name["socket_connect"]["escaped"]


def test_interpreter_in_tmp_keeps_strong_isolation():
    """bwrap mounts a private tmpfs over /tmp: a venv there must be bound back in, or the
    strong backend fails its probe and the executor silently falls back to weak isolation."""
    if shutil.which("bwrap") is None:
        # Without bubblewrap the strong backend must be refused, never faked.
        with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
            SandboxExecutor(SandboxConfig(isolation="bwrap", workers=1))
        return
    venv = Path(tempfile.mkdtemp(prefix="qmath-venv-in-tmp-", dir="/tmp"))
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
            check=True,
            timeout=120,
        )
        os.chmod(venv, 0o755)
        # A module only this venv has: importing it proves its site-packages is visible.
        (site,) = venv.glob("lib/python*/site-packages")
        (site / "qmath_tmp_venv_probe.py").write_text("VALUE = 'from the venv in /tmp'\n")
        python = str(venv / "bin" / "python")
        config = SandboxConfig(python=python, isolation="bwrap", workers=1)
        with SandboxExecutor(config) as ex:
            assert ex.isolation.backend == "bwrap" and ex.isolation.strong
            code = "import sys, qmath_tmp_venv_probe as m\nprint(sys.prefix, m.VALUE)\n"
            result = ex.run(code + "open('/tmp/x', 'w')\n")
        assert result.status == "ok", result.stderr
        assert result.stdout.strip() == f"{venv} from the venv in /tmp"
    finally:
        shutil.rmtree(venv)


# --- qmath exec -----------------------------------------------------------------------


def test_qmath_exec_prints_json(tmp_path):
    program = tmp_path / "prog.py"
    program.write_text("import sys\nprint('hello')\nsys.exit(3)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qmath_megatron", "exec", str(program), "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"status", "stdout", "stderr", "seconds", "returncode", "isolation"} <= set(result)
    assert (result["status"], result["stdout"], result["returncode"]) == ("error", "hello\n", 3)


def test_qmath_exec_missing_file_is_one_line(tmp_path, capsys):
    assert main(["exec", str(tmp_path / "nope.py")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qmath: error:") and "nope.py" in err and err.count("\n") == 1

"""``qmath exec``: run one Python file in the sandbox, or check the sandbox itself.

``qmath exec FILE.py`` prints the result as JSON and exits 0 whenever the sandbox ran (the
program's own outcome is in ``status``). ``qmath exec --self-test`` runs the hostile corpus
and exits 1 if anything escaped or hung. The flags, ``--config FILE.yaml`` and ``key=value``
set the :class:`~qmath_megatron.sandbox.config.SandboxConfig` (e.g. ``max_processes=4``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qmath_megatron.config.cli import ConfigArgs, build_config
from qmath_megatron.sandbox.config import ISOLATION_MODES, SandboxConfig

_RESULT_KEYS = ("status", "stdout", "stderr", "seconds", "returncode", "isolation")


def _read_program(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"not a regular file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    from qmath_megatron.sandbox.isolation import SandboxUnavailable

    try:
        return _execute(args)
    except SandboxUnavailable as exc:
        # Not an input error, but just as much a one-line answer (e.g. --require-strong).
        print(f"qmath: error: sandbox unavailable: {exc}", file=sys.stderr)
        return 1


def _execute(args: argparse.Namespace) -> int:
    from qmath_megatron.sandbox.executor import SandboxExecutor
    from qmath_megatron.sandbox.hostile import SELF_TEST_CONFIG, self_test

    if args.self_test:
        if args.file is not None:
            raise ValueError("give either FILE or --self-test, not both")
        report = self_test(build_config(args, base=SELF_TEST_CONFIG))
        print(json.dumps(report, indent=2))
        return 1 if report["escapes"] or report["hangs"] else 0
    if args.file is None:
        raise ValueError("missing FILE (or --self-test)")
    code = _read_program(args.file)
    config = build_config(args, base=SandboxConfig(workers=1))
    with SandboxExecutor(config) as executor:
        result = executor.run(code)
    print(json.dumps({key: getattr(result, key) for key in _RESULT_KEYS}, indent=2))
    sys.stdout.flush()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "exec",
        help="run a Python file in the sandbox (or --self-test the sandbox)",
        description="Run untrusted Python in the sandbox and print the result as JSON.",
    )
    p.add_argument("file", nargs="?", default=None, metavar="FILE.py")
    # Unset flags keep the base config's values (the self-test's own limits, or the
    # defaults), hence no defaults here.
    a = ConfigArgs(p, SandboxConfig)
    a.add("timeout_s", "--timeout", default=None, help="wall-clock seconds (10)")
    a.add("memory_mb", default=None, help="address-space limit (1024)")
    a.add("isolation", choices=ISOLATION_MODES, default=None, help="backend (auto)")
    a.add("require_strong", help="fail instead of running with weak isolation")
    p.add_argument(
        "--self-test",
        action="store_true",
        help="run the hostile-program corpus; exit 1 on any escape or hang",
    )
    a.finish()
    p.set_defaults(func=_run)

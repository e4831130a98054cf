"""Sandboxed execution of untrusted, model-written Python code (TIR evaluation, RL rewards).

Isolation is enforced by the kernel (namespaces via bubblewrap, a per-call unprivileged uid,
rlimits), never by Python-level hooks, which ``ctypes`` bypasses. See
:mod:`qmath_megatron.sandbox.isolation` for the backends and
:mod:`qmath_megatron.sandbox.hostile` for the corpus that checks them.
"""

from qmath_megatron.sandbox.config import SandboxConfig
from qmath_megatron.sandbox.executor import ExecResult, SandboxExecutor
from qmath_megatron.sandbox.isolation import IsolationReport, SandboxUnavailable, detect_isolation

__all__ = [
    "ExecResult",
    "IsolationReport",
    "SandboxConfig",
    "SandboxExecutor",
    "SandboxUnavailable",
    "detect_isolation",
]

"""The CPU compatibility layer: CUDA requests land on CPU, Megatron's checks keep working."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op on GPU")


def _run(code: str) -> str:
    """Activate the layer in a fresh interpreter (it is process-global by design)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_cuda_requests_become_cpu_and_type_names_report_cuda():
    out = _run(
        """
        import torch
        from qmath_megatron.parallel import cpu_compat
        assert cpu_compat.activate() and cpu_compat.is_active()
        a = torch.zeros(3, device="cuda")
        b = torch.ones(2, device=torch.device("cuda", 0)).cuda()
        c = torch.arange(4).to("cuda")
        d = torch.empty(2, 2, dtype=torch.bfloat16, device=torch.cuda.current_device())
        print(a.device, b.device, c.device, d.device, a.type(), d.type(), a.type(torch.int64).dtype)
        """
    )
    assert out == "cpu cpu cpu cpu torch.cuda.FloatTensor torch.cuda.BFloat16Tensor torch.int64"


def test_rng_state_round_trips_through_cuda_api():
    out = _run(
        """
        import torch
        from qmath_megatron.parallel import cpu_compat
        cpu_compat.activate()
        torch.cuda.manual_seed(5)
        state = torch.cuda.get_rng_state()
        x = torch.rand(3)
        torch.cuda.set_rng_state(state)
        y = torch.rand(3)
        torch.manual_seed(5)  # must not recurse through torch.cuda.manual_seed_all
        print(torch.equal(x, y), torch.equal(torch.rand(3), x))
        """
    )
    assert out == "True True"


def test_megatron_rng_tracker_forks_distinct_streams():
    out = _run(
        """
        import torch
        from qmath_megatron.parallel import cpu_compat
        cpu_compat.activate()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
        tracker = get_cuda_rng_tracker()
        tracker.add("stream-a", 1234)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        with tracker.fork("stream-a"):
            inside = torch.rand(2)
        # The default stream is untouched by the fork; the forked stream is seeded apart.
        print(torch.equal(before, torch.get_rng_state()), not torch.equal(inside, torch.rand(2)))
        """
    )
    assert out == "True True"


def test_inactive_without_activation():
    from qmath_megatron.parallel import cpu_compat

    code = (
        "from qmath_megatron.parallel import cpu_compat; import torch; "
        "print(cpu_compat.is_active(), torch.zeros(1).type())"
    )
    assert _run(code) == "False torch.FloatTensor"
    assert callable(cpu_compat.activate)

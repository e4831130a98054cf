"""GPU tests: skipped cleanly without CUDA, or without the package a module names in its
``REQUIRES`` (default: Transformer Engine)."""

import importlib.util

import pytest
import torch

_INSTALL_HINT = {
    "transformer_engine": "pip install -e .[gpu]",
    "vllm": "pip install -e .[rollout]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/gpu/" not in str(item.fspath):
            continue
        reason = None
        if not torch.cuda.is_available():
            reason = "needs a CUDA GPU"
        else:
            for package in getattr(item.module, "REQUIRES", ("transformer_engine",)):
                if importlib.util.find_spec(package) is None:
                    reason = f"needs {package} ({_INSTALL_HINT.get(package, 'pip install')})"
                    break
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))

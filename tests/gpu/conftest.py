import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif importlib.util.find_spec("transformer_engine") is None:
        reason = "needs Transformer Engine (pip install -e .[gpu])"
    if reason:
        for item in items:
            if "tests/gpu/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))

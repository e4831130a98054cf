"""GPU tests: skipped only when there is no CUDA GPU. On a GPU machine a package the module
names in ``REQUIRES`` (default: Transformer Engine) must be installed: its absence fails the
test with the install command, since a skipped GPU test would prove nothing there."""

import importlib.util

import pytest
import torch

_INSTALL_HINT = {
    "transformer_engine": "pip install -e .[gpu]",
    "vllm": "pip install -e .[rollout]",
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(autouse=True)
def _required_packages(request):
    for package in getattr(request.module, "REQUIRES", ("transformer_engine",)):
        if importlib.util.find_spec(package) is None:
            pytest.fail(
                f"GPU test needs {package}: {_INSTALL_HINT.get(package, 'pip install ' + package)}"
            )

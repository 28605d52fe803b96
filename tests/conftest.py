import os
import tempfile

import pytest

from fgcupy.bridge import cupy_available

# Compile checks must never reuse a binary from an earlier run.
os.environ.setdefault("CUPY_CACHE_DIR", tempfile.mkdtemp(prefix="fgcupy-cupy-cache-"))
# Tuned results of the user's cache must not change which kernel a test runs.
os.environ.setdefault("FGCUPY_CACHE_DIR", tempfile.mkdtemp(prefix="fgcupy-autotune-"))


def _gpu_ready() -> bool:
    import torch

    return torch.cuda.is_available() and cupy_available()


GPU_READY = _gpu_ready()


def pytest_collection_modifyitems(config, items):
    if GPU_READY:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda or cupy sees no device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

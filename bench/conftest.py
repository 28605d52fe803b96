"""The pytest-benchmark suite runs on a CUDA GPU only: without one every case is skipped."""

import pytest
import torch

from fgcupy.bridge import cupy_available


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and cupy_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU: torch.cuda or cupy sees no device on this machine")
    for item in items:
        item.add_marker(skip)

"""Skip marks shared by the test modules that compile kernels (CPU CI installs libnvrtc; a
machine without it skips those tests with this reason)."""

import pytest

from fgcupy.jit import nvrtc

needs_nvrtc = pytest.mark.skipif(not nvrtc.available(), reason="no libnvrtc (nvidia-cuda-nvrtc) to compile with")

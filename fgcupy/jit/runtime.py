"""Run-time compilation with cupy.RawModule: one module per (spec, device) in this process.

Between processes CuPy's disk cache (CUPY_CACHE_DIR) holds the binaries; the source hash in
the options keeps it honest when a header changes.
"""

from __future__ import annotations

import logging
import threading
import time

from .source import kernel_source, nvrtc_options, spec_defines

log = logging.getLogger("fgcupy")

_lock = threading.Lock()
_kernels: dict = {}


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel specialization; carries the spec and the compiler log."""

    def __init__(self, spec, nvrtc_log: str):
        self.spec = spec
        self.nvrtc_log = nvrtc_log
        super().__init__(f"NVRTC failed to compile {spec.name} ({spec.name_expression}):\n{nvrtc_log}")


def get_kernel(spec):
    """The cupy.RawKernel for ``spec`` on the current device, compiled on first use."""
    import cupy

    device = cupy.cuda.Device().id
    key = (spec, device)
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _compile(spec)
            _kernels[key] = kernel
    return kernel


def get_kernel_on(device, spec):
    """``get_kernel`` on a torch device (its index, or torch's current device)."""
    import cupy
    import torch

    with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        return get_kernel(spec)


def module_options(spec) -> tuple[str, ...]:
    """NVRTC options for ``spec``'s module (``source.spec_defines`` makes it the spec's own)."""
    return nvrtc_options() + tuple(spec.extra_options) + spec_defines(spec)


def _compile(spec):
    import cupy

    started = time.perf_counter()
    module = cupy.RawModule(
        code=kernel_source(spec),
        options=module_options(spec),
        name_expressions=[spec.name_expression],
    )
    try:
        kernel = module.get_function(spec.name_expression)
    except cupy.cuda.compiler.CompileException as err:
        raise KernelCompileError(spec, err.get_message() if hasattr(err, "get_message") else str(err)) from err
    if spec.smem_bytes > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = spec.smem_bytes
    log.info("fgcupy: loaded %s in %.2f s", spec.name, time.perf_counter() - started)
    return kernel

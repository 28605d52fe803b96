"""NVRTC (through cuda.bindings) from a spec to a cubin: what the runtime loads and the CPU tests
read ptxas' report of. No GPU is needed, only the architecture to compile for."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .source import kernel_source, nvrtc_options, spec_defines

#: Options cupy.RawModule adds to every compile; kept so binaries match those it built.
RUNTIME_EXTRAS = ("-ftz=true", "--device-as-default-execution-space")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel specialization; carries the spec and the compiler log."""

    def __init__(self, spec, nvrtc_log: str):
        self.spec = spec
        self.nvrtc_log = nvrtc_log
        super().__init__(f"NVRTC failed to compile {spec.name} ({spec.name_expression}):\n{nvrtc_log}")


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    lowered_name: str
    log: str


def compile_options(spec, arch: str) -> tuple[str, ...]:
    """Every NVRTC option of ``spec`` for ``arch`` (e.g. "sm_90", or "sm_90a" for wgmma specs)."""
    return nvrtc_options() + spec_defines(spec) + RUNTIME_EXTRAS + (f"-arch={arch}",)


_nvrtc_lock = threading.Lock()


def _nvrtc():
    """cuda.bindings' NVRTC module with its library loaded, under a lock: the first compiles of
    two threads (a kernel and the launch order, side by side) must not load it at once."""
    with _nvrtc_lock:
        from cuda.bindings import nvrtc

        nvrtc.nvrtcVersion()
    return nvrtc


def compile_cubin(spec, arch: str, extra_options: tuple = ()) -> CompiledKernel:
    """Compile ``spec`` for ``arch``; KernelCompileError with NVRTC's log if it fails."""
    nvrtc = _nvrtc()

    def check(result):
        err, *values = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return values[0] if len(values) == 1 else values

    prog = check(nvrtc.nvrtcCreateProgram(kernel_source(spec).encode(), spec.source.encode(), 0, [], []))
    try:
        check(nvrtc.nvrtcAddNameExpression(prog, spec.name_expression.encode()))
        options = [o.encode() for o in compile_options(spec, arch) + tuple(extra_options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(spec, log)
        lowered = check(nvrtc.nvrtcGetLoweredName(prog, spec.name_expression.encode())).decode()
        cubin = b" " * check(nvrtc.nvrtcGetCUBINSize(prog))
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompiledKernel(bytes(cubin), lowered, log)

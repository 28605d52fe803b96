"""NVRTC (libnvrtc through ctypes) from a spec to a cubin: what the runtime loads and the CPU tests
read ptxas' report of. No GPU is needed, only the architecture to compile for."""

from __future__ import annotations

from dataclasses import dataclass

from . import nvrtc
from .source import kernel_source, nvrtc_options, spec_defines

#: Options cupy.RawModule adds to every compile; kept so binaries match those it built.
RUNTIME_EXTRAS = ("-ftz=true", "--device-as-default-execution-space")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel specialization; carries the spec and the compiler log."""

    def __init__(self, spec, nvrtc_log: str, arch: str | None = None):
        self.spec = spec
        self.nvrtc_log = nvrtc_log
        self.arch = arch
        target = f" for {arch}" if arch else ""
        super().__init__(f"NVRTC failed to compile {spec.name} ({spec.name_expression}){target}:\n{nvrtc_log}")

    def __reduce__(self):  # pickles whole (worker pools, multiprocessing), the log included
        return type(self), (self.spec, self.nvrtc_log, self.arch)


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    lowered_name: str
    log: str


def compile_options(spec, arch: str) -> tuple[str, ...]:
    """Every NVRTC option of ``spec`` for ``arch`` (e.g. "sm_90", or "sm_90a" for wgmma specs)."""
    return nvrtc_options() + spec_defines(spec) + RUNTIME_EXTRAS + (f"-arch={arch}",)


def compile_cubin(spec, arch: str, extra_options: tuple = ()) -> CompiledKernel:
    """Compile ``spec`` for ``arch``; KernelCompileError with NVRTC's log if it fails,
    ``nvrtc.NvrtcUnavailable`` (an ImportError) where there is no libnvrtc."""
    options = compile_options(spec, arch) + tuple(extra_options)
    ok, log, lowered, cubin = nvrtc.compile_program(kernel_source(spec), spec.source, spec.name_expression, options)
    if not ok:
        raise KernelCompileError(spec, log, arch)
    return CompiledKernel(cubin, lowered, log)

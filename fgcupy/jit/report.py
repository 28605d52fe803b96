"""Compile a spec to a cubin for a chosen architecture without a GPU and read ptxas' report.

Uses the same source and options as the runtime path (cupy.RawModule), plus the target and
``-Xptxas=-v``. CI uses it to prove every specialization builds for sm_80/sm_90/sm_90a with
no spills; the autotuner uses it to skip configurations that do not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .source import kernel_source, nvrtc_options, spec_defines


@dataclass(frozen=True)
class PtxasReport:
    spec_name: str
    arch: str
    lowered_name: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_smem_bytes: int
    cubin_bytes: int
    log: str


def compile_report(spec, arch: str = "sm_90") -> PtxasReport:
    """Compile ``spec`` for ``arch`` (e.g. "sm_80", "sm_90", "sm_90a") and parse ptxas -v."""
    from cuda.bindings import nvrtc

    from .runtime import KernelCompileError

    def check(result):
        err, *values = result
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC call failed: {err}")
        return values[0] if len(values) == 1 else values

    source = kernel_source(spec).encode()
    prog = check(nvrtc.nvrtcCreateProgram(source, spec.source.encode(), 0, [], []))
    try:
        check(nvrtc.nvrtcAddNameExpression(prog, spec.name_expression.encode()))
        # cupy.RawModule adds -ftz=true and --device-as-default-execution-space: mirror them.
        runtime_extras = ("-ftz=true", "--device-as-default-execution-space")
        options = [o.encode() for o in nvrtc_options() + spec_defines(spec) + runtime_extras]
        options += [f"-arch={arch}".encode(), b"-Xptxas=-v"]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, buf))
        log = buf.rstrip(b"\x00 ").decode(errors="replace")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(spec, log)
        lowered = check(nvrtc.nvrtcGetLoweredName(prog, spec.name_expression.encode())).decode()
        cubin_size = check(nvrtc.nvrtcGetCUBINSize(prog))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return _parse(spec.name, arch, lowered, log, cubin_size)


def _parse(spec_name, arch, lowered, log, cubin_size) -> PtxasReport:
    # ptxas prints one block per entry function; keep the block of ours.
    block = log.split(f"Compiling entry function '{lowered}'", 1)
    if len(block) != 2:
        raise ValueError(f"ptxas report has no entry for {lowered} ({spec_name}, {arch}):\n{log}")
    text = block[1].split("Compiling entry function", 1)[0]

    def number(pattern, default=None):
        found = re.search(pattern, text)
        if found is None:
            if default is None:
                raise ValueError(f"cannot find {pattern!r} in ptxas report of {spec_name}:\n{text}")
            return default
        return int(found.group(1))

    return PtxasReport(
        spec_name=spec_name,
        arch=arch,
        lowered_name=lowered,
        registers=number(r"Used (\d+) registers"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        spill_store_bytes=number(r"(\d+) bytes spill stores"),
        spill_load_bytes=number(r"(\d+) bytes spill loads"),
        static_smem_bytes=number(r"(\d+) bytes smem", default=0),
        cubin_bytes=cubin_size,
        log=log,
    )

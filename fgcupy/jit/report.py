"""Compile a spec to a cubin for a chosen architecture without a GPU and read ptxas' report.

Uses the same compile as the runtime path (``compile.compile_cubin``), plus ``-Xptxas=-v``. CI uses it to prove every specialization builds for sm_80/sm_90/sm_90a with
no spills; the autotuner uses it to skip configurations that do not fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .compile import compile_cubin


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
    compiled = compile_cubin(spec, arch, ("-Xptxas=-v",))
    return _parse(spec.name, arch, compiled.lowered_name, compiled.log, len(compiled.cubin))


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

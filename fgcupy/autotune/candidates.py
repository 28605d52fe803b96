"""Candidate kernels of a key and whether each fits the device (ptxas reports)."""

from __future__ import annotations


import threading
from dataclasses import dataclass


from ..jit import AttentionSpec, KernelCompileError, all_attention_specs, all_sm90_specs, all_sm90_ws_specs
from ..tiles import default_spec
from .keys import DeviceInfo

# Candidates and fit
# ---------------------------------------------------------------------------------------------
def heuristic_spec(dtype: str, head_dim: int, slice_m: int, arch: str | None = None) -> AttentionSpec:
    """The documented default when nothing is tuned: ``tiles.default_spec`` (the wgmma
    kernel on Hopper, the mma.sync kernel elsewhere)."""
    return default_spec(dtype, head_dim, slice_m, arch)


def candidate_specs(dtype: str, head_dim: int, slice_m: int, arch: str | None = None) -> list[AttentionSpec]:
    """Every shipped spec (the set CI compiles) for this dtype, head dim and slice size, plus the
    heuristic default; device limits are applied later by ``check_fit``. The wgmma specs (both
    kernels) join on Hopper (``arch`` "sm_90")."""
    shipped = all_attention_specs() + (all_sm90_specs() + all_sm90_ws_specs() if arch == "sm_90" else [])
    specs = [s for s in shipped if (s.dtype, s.head_dim, s.slice_m) == (dtype, head_dim, slice_m)]
    default = heuristic_spec(dtype, head_dim, slice_m, arch)
    if default not in specs:
        specs.insert(0, default)
    return specs


@dataclass
class Fit:
    registers: int | None
    smem_bytes: int
    spill_bytes: int | None
    reason: str | None  # None: fits


def check_fit(spec: AttentionSpec, info: DeviceInfo, compiler=None) -> Fit:
    """Compile ``spec`` for the device's arch and compare ptxas' numbers with its limits."""
    if compiler is None:
        from ..jit.report import compile_report as compiler
    try:
        rep = compiler(spec, getattr(spec, "arch", None) or info.arch)  # sm_90a-only specs name their own
    except KernelCompileError as err:
        first = next((line for line in err.nvrtc_log.splitlines() if "error" in line), "see log")
        return Fit(None, spec.smem_bytes, None, f"compile failed: {first.strip()[:80]}")
    except ImportError:
        # No libnvrtc: judge shared memory from the spec;
        # the runtime compile in the measurement catches what does not build.
        rep = None
    except Exception as err:  # noqa: BLE001 - an unreadable report skips the candidate, not the tune
        return Fit(None, spec.smem_bytes, None, f"no ptxas report: {type(err).__name__}: {str(err)[:60]}")
    static = rep.static_smem_bytes if rep is not None else 0
    smem = spec.smem_bytes + static
    registers = rep.registers if rep is not None else None
    spills = rep.spill_store_bytes + rep.spill_load_bytes if rep is not None else None
    if smem > info.smem_per_block_optin:
        return Fit(registers, smem, spills, f"smem {smem} B > {info.smem_per_block_optin} B per block")
    if registers is not None and registers * spec.threads > info.regs_per_block:
        return Fit(registers, smem, spills,
                   f"{registers} regs x {spec.threads} threads > {info.regs_per_block} per block")
    return Fit(registers, smem, spills, None)


_reports: dict = {}
_reports_lock = threading.Lock()


def _cached_compile_report(spec, arch):
    """compile_report, once per (spec, arch) in this process (densities share a spec's report)."""
    from ..jit.report import compile_report

    with _reports_lock:
        if (spec, arch) in _reports:
            return _reports[(spec, arch)]
    rep = compile_report(spec, arch)
    with _reports_lock:
        _reports[(spec, arch)] = rep
    return rep

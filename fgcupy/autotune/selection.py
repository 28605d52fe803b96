"""Choosing a winner from timings (the heuristic default stays within the noise margin) and
the tune loop over candidates."""

from __future__ import annotations


import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping


from ..jit import AttentionSpec
from .candidates import _cached_compile_report, candidate_specs, check_fit, heuristic_spec
from .keys import DeviceInfo, ProblemKey

# A candidate must beat the heuristic default by more than this fraction to replace it.
NOISE_MARGIN = 0.03


# Selection and results
# ---------------------------------------------------------------------------------------------
#: How a Measurement's note starts when the kernel ran and gave a wrong result.
WRONG_RESULT = "wrong result"


@dataclass
class Measurement:
    ms: float | None
    tflops: float | None = None
    note: str = ""
    registers: int | None = None  # from the loaded kernel, for tables without a ptxas report


def select_winner(timings: Mapping[AttentionSpec, float | None], default: AttentionSpec,
                  margin: float = NOISE_MARGIN) -> AttentionSpec | None:
    """Fastest valid spec, but the default unless the fastest beats it by more than ``margin``."""
    valid = {s: t for s, t in timings.items() if t is not None and math.isfinite(t) and t > 0}
    if not valid:
        return None
    best = min(valid, key=lambda s: (valid[s], s.name))
    if default in valid and valid[best] >= valid[default] * (1.0 - margin):
        return default
    return best


@dataclass
class Candidate:
    spec: AttentionSpec
    registers: int | None
    smem_bytes: int | None
    spill_bytes: int | None
    ms: float | None
    tflops: float | None
    status: str

    def row(self) -> dict:
        return {"spec": self.spec.name, "registers": self.registers, "smem_bytes": self.smem_bytes,
                "spill_bytes": self.spill_bytes, "ms": self.ms, "tflops": self.tflops, "status": self.status}


@dataclass
class TuneResult:
    key: ProblemKey
    default: AttentionSpec
    winner: AttentionSpec
    measured: bool  # False: no candidate could be timed; winner is the heuristic default
    candidates: list[Candidate]
    seconds: float
    workload: dict = field(default_factory=dict)
    # False where the default fit but could not be timed (an error, not a wrong result): the
    # winner was not compared with it, so it serves this process and is not stored.
    compared: bool = True

    @property
    def storable(self) -> bool:
        return self.measured and self.compared

    def ms_of(self, spec: AttentionSpec) -> float | None:
        return next((c.ms for c in self.candidates if c.spec == spec), None)

    @property
    def speedup(self) -> float | None:
        d, w = self.ms_of(self.default), self.ms_of(self.winner)
        return d / w if d and w else None

    def to_entry(self) -> dict:
        return {
            "key": dataclasses.asdict(self.key),
            "spec": dataclasses.asdict(self.winner),
            "kernel": type(self.winner).__name__,
            "spec_name": self.winner.name,
            "default": self.default.name,
            "winner_ms": self.ms_of(self.winner),
            "default_ms": self.ms_of(self.default),
            "tune_seconds": round(self.seconds, 3),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workload": self.workload,
            "candidates": [c.row() for c in self.candidates],
        }

    def table(self) -> str:
        return format_table(self.key.id, [c.row() for c in self.candidates], self.default.name, self.winner.name)


def format_table(title: str, rows: list[dict], default_name: str, winner_name: str) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [title, "| spec | regs | smem KB | spill B | ms | TFLOP/s | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = [t for t, n in (("default", default_name), ("WINNER", winner_name)) if r["spec"] == n]
        status = ", ".join(tag + ([r["status"]] if r["status"] != "ok" else []))
        smem = None if r["smem_bytes"] is None else r["smem_bytes"] / 1024
        lines.append(f"| {r['spec']} | {num(r['registers'], 'd')} | {num(smem, '.1f')} | {num(r['spill_bytes'], 'd')}"
                     f" | {num(r['ms'], '.3f')} | {num(r['tflops'], '.0f')} | {status} |")
    return "\n".join(lines)


def tune(key: ProblemKey, info: DeviceInfo, measure: Callable[[list[AttentionSpec]], Mapping[AttentionSpec, Measurement]],
         *, compiler=None, margin: float = NOISE_MARGIN, progress: Callable[[str], None] | None = None,
         workload: dict | None = None) -> TuneResult:
    """Enumerate, fit-check, measure and select for one key. ``measure`` times a list of specs
    (``EventMeasure`` on a GPU; tests pass a fake); ``compiler`` defaults to ``compile_report``."""
    progress = progress or (lambda line: None)
    started = time.perf_counter()
    compiler = compiler or _cached_compile_report
    specs = candidate_specs(key.dtype, key.head_dim, key.slice_m, key.arch)
    default = heuristic_spec(key.dtype, key.head_dim, key.slice_m, key.arch)
    progress(f"{key.id}: checking {len(specs)} candidates for {info.arch}")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        fits = list(pool.map(lambda s: check_fit(s, info, compiler), specs))
    runnable = [s for s, f in zip(specs, fits) if f.reason is None]
    for s, f in zip(specs, fits):
        if f.reason is not None:
            progress(f"  skip {s.name}: {f.reason}")
    progress(f"  timing {len(runnable)} candidates")
    measured = dict(measure(runnable)) if runnable else {}
    candidates = []
    for s, f in zip(specs, fits):
        m = measured.get(s)
        if f.reason is not None:
            status = f"skipped: {f.reason}"
        elif m is None or m.ms is None:
            status = f"failed: {m.note if m else 'not measured'}"
        else:
            status = "ok"
        registers = f.registers if f.registers is not None else (m.registers if m else None)
        candidates.append(Candidate(s, registers, f.smem_bytes, f.spill_bytes, m.ms if m else None,
                                    m.tflops if m else None, status))
    winner = select_winner({c.spec: c.ms for c in candidates if c.status == "ok"}, default, margin)
    default_run = measured.get(default)
    compared = default not in runnable or (default_run is not None and (
        default_run.ms is not None or default_run.note.startswith(WRONG_RESULT)))
    result = TuneResult(key, default, winner or default, winner is not None, candidates,
                        time.perf_counter() - started, workload or {}, compared)
    if winner is not None and not compared:
        progress(f"  the default {default.name} could not be timed "
                 f"({default_run.note if default_run else 'not measured'}): the winner serves this process only")
    if winner is None:
        progress(f"  no candidate could be timed: keeping the heuristic default {default.name}")
    else:
        speed = result.speedup
        progress(f"  winner {winner.name}" + (f" ({speed:.3f}x the default)" if speed else "")
                 + f" after {result.seconds:.1f} s")
    return result

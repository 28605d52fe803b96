"""CUDA-event timing on torch's current stream: warm up, then the median of many runs.

One helper for the demo, the autotuner and the benchmarks, so every number fgcupy reports is
measured the same way.

Two readings of "how long": by default each run starts on an idle GPU, so the time includes the
host's work until the first kernel is queued (an isolated call's latency). With ``queued=True``
the GPU is first kept busy (``torch.cuda._sleep``) for longer than ``fn``'s host time, so ``fn``'s
kernels are all queued before the start event fires and the events measure GPU time alone: what
the call costs inside a model whose host runs ahead of the GPU. A host synchronisation inside
``fn`` still counts in full (the GPU idles while the host catches up).
"""

from __future__ import annotations

import math
import numbers
import statistics
import time
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device_index: int) -> float:
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # warm
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    stop.record()
    stop.synchronize()
    return cycles / start.elapsed_time(stop)


def queue_lead_cycles(fn, calls: int, device) -> int:
    """``torch.cuda._sleep`` cycles that keep ``device`` busy while the host queues ``calls``
    calls of ``fn`` (twice their host time, timed on one call, plus a millisecond)."""
    with torch.cuda.device(device):
        started = time.perf_counter()
        fn()
        host_ms = (time.perf_counter() - started) * 1e3
        return int(_sleep_cycles_per_ms(torch.cuda.current_device()) * (2.0 * calls * host_ms + 1.0))


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10, queued: bool = False, host_ms: float | None = None) -> dict:
    """Median / min / max milliseconds of ``fn()`` measured with CUDA events (see the module
    docstring for ``queued``), and ``host_ms``, the host time of the last timed call. Queued
    timing sizes its lead from the last warm-up call's host time, or from ``host_ms`` where
    there is no warm-up (a call that cannot be repeated): without either it would cover only
    a millisecond of host work, and the rest would land between the events."""
    for name, value, least in (("warmup", warmup, 0), ("reps", reps, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    warmup, reps = int(warmup), int(reps)
    if not isinstance(queued, bool):  # "no" would time queued
        raise TypeError(f"queued must be a bool, got {queued!r}")
    if host_ms is not None and (isinstance(host_ms, bool) or not isinstance(host_ms, numbers.Real)
                                or not 0 <= host_ms < math.inf):
        raise ValueError(f"host_ms must be a finite number of milliseconds >= 0 (or None), got {host_ms!r}")
    if queued and warmup == 0 and host_ms is None:
        raise ValueError("queued timing without warm-up needs host_ms, the host time of one call")
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_time_ms times with CUDA events: it needs a CUDA GPU")
    from .jit.runtime import wait_for_background

    wait_for_background()  # kernels still compiling on threads: a stand-in would be timed in their place
    host_s = 0.0 if host_ms is None else host_ms / 1e3
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        host_s = time.perf_counter() - t0  # the last warm-up: compiles and caches are done
    if warmup and wait_for_background():  # compiles fn's own calls started: one more call loads them
        fn()
    torch.cuda.synchronize()
    lead = 0
    if queued:
        lead = int(_sleep_cycles_per_ms(torch.cuda.current_device()) * (2.0 * host_s * 1e3 + 1.0))
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if lead:
            torch.cuda._sleep(lead)
        start.record()
        t0 = time.perf_counter()
        fn()
        host_s = time.perf_counter() - t0
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps,
            "queued": queued, "host_ms": host_s * 1e3}

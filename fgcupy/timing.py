"""CUDA-event timing on torch's current stream: warm up, then the median of many runs.

One helper for the demo, the autotuner and the benchmarks, so every number fgcupy reports is
measured the same way.
"""

from __future__ import annotations

import statistics

import torch


def cuda_time_ms(fn, warmup: int = 3, reps: int = 10) -> dict:
    """Median / min / max milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}

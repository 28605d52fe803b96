"""CUDA-event timing: warm up, then the median of many runs, on torch's current stream."""

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


def attention_tflops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, ms: float,
                     density: float = 1.0) -> float:
    """Dense-equivalent TFLOP/s (4·B·H·Sq·Skv·D / t) scaled by the kept fraction."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim * density / (ms * 1e-3) / 1e12

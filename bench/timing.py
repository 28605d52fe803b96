"""Benchmark arithmetic; timing itself is ``fgcupy.timing.cuda_time_ms`` (re-exported here)."""

from __future__ import annotations

import torch

from fgcupy.timing import cuda_time_ms  # noqa: F401 - the benchmarks' timer


def require_cuda(program: str) -> None:
    """SystemExit naming ``program`` where torch sees no CUDA GPU (it times kernels), instead of
    an error from deep inside torch."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{program} times CUDA kernels: it needs a CUDA GPU, and torch sees none here")


def attention_tflops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, ms: float,
                     density: float = 1.0) -> float:
    """Dense-equivalent TFLOP/s (4·B·H·Sq·Skv·D / t) scaled by the kept fraction."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim * density / (ms * 1e-3) / 1e12

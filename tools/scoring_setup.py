"""The common setup of the scoring probes: wan14b-480p's video-like "mixed" inputs, SDPA cuDNN
timed beside them, and the default's pooled rows (sub-blocks of 32) with their LSE."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.cases import sdpa_call
from bench.timing import require_cuda
from fgcupy import mask_kernels
from fgcupy import mask_reference as ref
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import SHAPES, VideoShape, video_qkv


def queued_ms(fn) -> float:
    """Queued GPU time of ``fn``: the CUDA-event median of 10 calls after 2 warm-up calls."""
    return cuda_time_ms(fn, warmup=2, reps=10, queued=True)["median_ms"]


@dataclass
class ScoringSetup:
    shape: VideoShape
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    dense_ms: float            # SDPA cuDNN dense attention, same run
    pooled: torch.Tensor       # mean queries of 32, [1, H, S / 32, D]
    pooled_lse: torch.Tensor   # their LSE over every key, [H, S / 32]


def scoring_setup(preset: str = "wan14b-480p") -> ScoringSetup:
    """Build the inputs, print the GPU and SDPA cuDNN's dense time, and score the pooled rows."""
    require_cuda("this probe")
    shape = SHAPES[preset]
    q, k, v = video_qkv(shape, "mixed", seed=0, device="cuda")
    scale = 1 / math.sqrt(shape.head_dim)
    print(torch.cuda.get_device_name())
    dense = queued_ms(sdpa_call(q, k, v, "cudnn"))
    print(f"SDPA cuDNN dense: {dense:.3f} ms")
    pooled = ref.pool_queries(q, 32).to(q.dtype).contiguous()
    pooled_lse = mask_kernels.gpu_scores("stats", pooled, k, scale, warps=8)
    return ScoringSetup(shape, q, k, v, scale, dense, pooled, pooled_lse)

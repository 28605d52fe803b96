"""q and k rounded to e4m3 on a Hopper GPU by two kernels (cuda_src/e4m3_convert.cu) that read
the 16-bit inputs twice and write one byte a value: each head's largest sum of squares of a
row, then the rounding. Torch's way (fgcupy.e4m3, the reference) reads them four times and writes full-size
intermediates. Inputs the kernels cannot read go the torch way, with the same result."""

from __future__ import annotations

import torch

from .e4m3 import heads_as_e4m3, scales_for
from .jit.e4m3_spec import CONVERT_THREADS, CONVERT_UNROLL, E4m3ConvertSpec
from .jit.launch import GRID_LIMITS, launch
from .jit import runtime
from .jit.score_spec import E4M3_HEAD_DIMS

_KERNEL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def gpu_heads_as_e4m3(q: torch.Tensor, k: torch.Tensor, bh0: int, nbh: int) -> tuple:
    """``fgcupy.e4m3.heads_as_e4m3`` (the same values) by the conversion kernels where both
    inputs suit them (``kernels_take``); no host sync. ValueError for heads [bh0, bh0 + nbh)
    not within q's and k's B x H."""
    for name, x in (("q", q), ("k", k)):
        heads = x.shape[0] * x.shape[1] if x.dim() == 4 else None
        if heads is None or not 0 <= bh0 <= bh0 + nbh <= heads:
            raise ValueError(f"heads [{bh0}, {bh0 + nbh}) are not within {name}'s {heads} (B x H of a [B, H, S, D] "
                             f"tensor, shape {tuple(x.shape)})")
    if not (kernels_take(q, nbh) and kernels_take(k, nbh)):
        return heads_as_e4m3(q, k, bh0, nbh)
    sumsq = torch.zeros(2, nbh, dtype=torch.float64, device=q.device)
    scales = torch.empty(2, nbh, dtype=torch.float32, device=q.device)
    q8 = _rounded_heads(q, bh0, nbh, sumsq[0], scales[0])
    k8 = _rounded_heads(k, bh0, nbh, sumsq[1], scales[1])
    return q8, k8, scales.prod(0).reciprocal_()


def kernels_take(x: torch.Tensor, nbh: int) -> bool:
    """Whether the kernels read ``x`` [B, H, S, D] as it lies: 16-bit on a Hopper GPU (they are
    built for sm_90), a head dim they have, rows of contiguous values at 16-byte steps, at most a
    grid's y of heads, and a head's 16-byte vectors (and a CTA's reach past them) counted in an int."""
    if x.device.type != "cuda" or x.dtype not in _KERNEL_DTYPES or x.dim() != 4 or x.shape[3] not in E4M3_HEAD_DIMS:
        return False
    if not runtime.is_hopper(runtime.device_index(x.device)):
        return False
    aligned = x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s, n in zip(x.stride()[:3], x.shape[:3]) if n > 1)
    reach = x.shape[2] * x.shape[3] // 8 + CONVERT_THREADS * CONVERT_UNROLL  # the last CTA's vectors, past the head's
    return aligned and x.stride(3) == 1 and 0 < nbh <= GRID_LIMITS[1] and reach < 2**31


def _rounded_heads(x: torch.Tensor, bh0: int, nbh: int, sumsq: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """e4m3 [1, nbh, S, D] of heads [bh0, bh0 + nbh) of x (batch-major); their scales, as
    fgcupy.e4m3.head_scales gives them, into ``scales`` (float32 [nbh]) by the rounding kernel
    from each head's largest sum of squares of a row, which the first kernel raises ``sumsq``
    (float64 [nbh], zeros) to."""
    _, heads, rows, dim = x.shape
    out = torch.empty(1, nbh, rows, dim, dtype=torch.float8_e4m3fn, device=x.device)
    if not rows:  # nothing to read: every head's largest magnitude stays 0
        scales.copy_(scales_for(sumsq))
        return out
    where = dict(x=x, stride_b=x.stride(0), stride_h=x.stride(1), stride_s=x.stride(2), heads=heads, bh0=bh0, rows=rows)
    find_sumsq, round_heads = (E4m3ConvertSpec(_KERNEL_DTYPES[x.dtype], dim, step) for step in ("sumsq", "round"))
    grid = E4m3ConvertSpec.grid(rows, dim, nbh)
    launch(find_sumsq, x.device, grid, find_sumsq.params.pack(sumsq=sumsq, **where))
    launch(round_heads, x.device, grid, round_heads.params.pack(sumsq=sumsq, scale=scales, out=out, **where))
    return out

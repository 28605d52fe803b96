"""Launch of the slice-sparse attention kernels: one AttnParams struct on torch's stream.

Below both the plan/run object (attention.py) and the tuner (autotune.py), which time and run
kernels through here.
"""

from __future__ import annotations

import math

import torch

from .jit.launch import launch
from .mask import SliceMask

SCHEDULES = ("longest_first", "index")


def block_order(mask: SliceMask, schedule: str = "longest_first") -> torch.Tensor:
    """int32 launch order of the (b, h, block) rows: longest list first, or index order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    lengths = mask.row_lengths().reshape(-1)
    if schedule == "longest_first":
        return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
    return torch.arange(lengths.numel(), dtype=torch.int32, device=lengths.device)


def _strides(t: torch.Tensor) -> tuple:
    """Element strides of B, H, S (a dimension of size one contributes nothing)."""
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))


def launch_attention(spec, q, k, v, out, lse, mask: SliceMask, order: torch.Tensor, scale: float) -> None:
    """Run ``spec`` on [B, H, S, D] views q, k, v into ``out`` (and float32 ``lse`` [B, H, q_len]
    or None) over ``mask`` in ``order``; inputs are already checked (attention.check_inputs)."""
    batch, heads, q_len, _ = q.shape
    items = batch * heads * mask.q_blocks
    if not (items and q_len):
        if lse is not None:
            lse.fill_(-math.inf)
        return
    strides = {}
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        strides.update(zip((f"{name}_sb", f"{name}_sh", f"{name}_ss"), _strides(t)))
    params = spec.params.pack(
        q=q, k=k, v=v, o=out, lse=lse, indptr=mask.indptr, indices=mask.indices, order=order,
        heads=heads, q_blocks=mask.q_blocks, q_len=q_len, kv_len=mask.kv_len, capacity=mask.capacity,
        scale_log2=scale * math.log2(math.e), **strides,
    )
    launch(spec, q.device, (items,), params)

"""Launch of the slice-sparse attention kernels: one AttnParams struct on torch's stream.

Below both the plan/run object (attention.py) and the tuner (the autotune package), which time and run
kernels through here.
"""

from __future__ import annotations

import math

import torch

from .jit.launch import launch
from .mask import SliceMask

SCHEDULES = ("longest_first", "index")
_DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16}


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
    or None) over ``mask`` in ``order``; shapes and dtypes already checked (check_inputs)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_strides(t, name)
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


def check_inputs(q, k, v, mask: SliceMask, spec=None) -> None:
    """ValueError/TypeError naming expected and actual for anything the kernel (``spec``) cannot
    take; with no spec (the CPU reference), any floating dtype shared by q, k and v. Strides are
    checked at launch (``launch_attention``), where tensors are real even inside torch.compile."""
    if spec is None:
        if not q.dtype.is_floating_point:
            raise TypeError(f"q must have a floating dtype, got {q.dtype}")
        expected_dtype, head_dim = q.dtype, q.shape[-1]
    else:
        expected_dtype, head_dim = _DTYPE_BY_NAME[spec.dtype], spec.head_dim
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != expected_dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the plan expects {expected_dtype}")
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device}, the mask and plan are on {mask.device}")
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[-1]}, the plan was made for {head_dim}")
    expected_q = (mask.batch, mask.heads, mask.q_len, head_dim)
    expected_kv = (mask.batch, mask.heads, mask.kv_len, head_dim)
    if tuple(q.shape) != expected_q:
        raise ValueError(f"q has [B, H, S, D] shape {tuple(q.shape)}, the mask expects {expected_q}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected_kv:
            raise ValueError(f"{name} has [B, H, S, D] shape {tuple(t.shape)}, the mask expects {expected_kv}")


def check_strides(t: torch.Tensor, name: str) -> None:
    """The kernel reads rows with 16-byte copies: unit stride over D, 8-element-aligned rows."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along the head dim (stride 1), got strides {t.stride()}")
    if any(s % 8 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) or t.data_ptr() % 16:
        raise ValueError(
            f"{name} rows must start on 16-byte boundaries (strides multiple of 8 elements, "
            f"aligned base); got strides {t.stride()}, address {t.data_ptr():#x}"
        )

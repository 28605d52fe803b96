"""Launch of the slice-sparse attention kernels: one AttnParams struct on torch's stream.

Below both the plan/run object (attention.py) and the tuner (the autotune package), which time and run
kernels through here.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import warnings

import torch

from .jit import driver
from .jit.launch import launch
from .jit.runtime import compile_in_background, get_kernel_on, load_in_background, loaded_kernel_on, ready_kernel_on
from .jit.plan_spec import ORDER_BUCKETS, ORDER_TILE_KEYS, LaunchOrderSpec, order_shift
from .jit.spec import ATTENTION_HEAD_DIMS, ATTN_TMA_PARAMS, SLICE_SIZES, AttentionSpec
from .mask import SliceMask
from .tiles import config_with

#: What the torch reference computes in (float32, or float64 for float64 inputs) and returns.
REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SCHEDULES = ("longest_first", "index")
_DTYPE_BY_NAME = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def block_order(mask: SliceMask, schedule: str = "longest_first") -> torch.Tensor:
    """int32 launch order of the (b, h, block) rows: most key tiles first (``order_buckets``),
    ties in index order; or index order. On CUDA the order is computed by fgcupy's own kernel
    (a torch sort's first use in a process costs tens of milliseconds); no host sync."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    rows = mask.batch * mask.heads * mask.q_blocks
    if schedule == "index" or rows == 0:
        return torch.arange(rows, dtype=torch.int32, device=mask.device)
    if mask.device.type != "cuda":
        lengths = mask.indptr[..., 1:].to(torch.int64) - mask.indptr[..., :-1].to(torch.int64)  # as the kernel: no wrap
        return torch.argsort(order_buckets(lengths.reshape(-1), mask.kv_len), descending=True,
                             stable=True).to(torch.int32)
    order = torch.empty(rows, dtype=torch.int32, device=mask.device)
    spec = LaunchOrderSpec()
    launch(spec, mask.device, (1,), spec.params.pack(indptr=mask.indptr.contiguous(), order=order, rows=rows,
                                                    q_blocks=mask.q_blocks, shift=order_shift(mask.kv_len)))
    return order


#: Set to 0 (or false, no, off) to have a first call wait for its Hopper kernel's compile
#: (``runnable_spec``).
STAND_IN_ENV = "FGCUPY_STAND_IN"


def stand_in_spec(spec) -> AttentionSpec:
    """The mma.sync kernel that stands in for the Hopper kernel ``spec`` (``runnable_spec``):
    the default one of its dtype, head dim and slice size."""
    return AttentionSpec(spec.dtype, spec.head_dim, spec.slice_m, **config_with(spec.head_dim, spec.slice_m))


def runnable_spec(device, spec):
    """``spec``, or while its Hopper kernel compiles for the first time on this machine (not in
    the disk cache), the portable mma.sync kernel of the same dtype, head dim and slice size,
    which NVRTC compiles in 49-61 % of the time (``python -m tools.compile_times``): the
    Hopper kernel compiles on a thread meanwhile and
    takes over at the first call after it is done. A first call of a new install so waits for
    one short compile, not the long one. Under a CUDA graph capture nothing is compiled or
    loaded that can be avoided: the Hopper kernel if it is loaded, else the stand-in if that is
    (a graph keeps the kernel it captured). FGCUPY_STAND_IN=0 waits for the Hopper kernel.
    Both kernels give the same results up to bf16/fp16 rounding."""
    value = os.environ.get(STAND_IN_ENV, "").strip().lower()
    waits = value in ("0", "false", "no", "off")
    if not waits and value not in ("", "1", "true", "yes", "on"):
        warnings.warn(f"fgcupy: {STAND_IN_ENV}={value!r} is not 0 or 1; a first call runs the stand-in while its "
                      "kernel compiles", RuntimeWarning, stacklevel=2)
    if isinstance(spec, AttentionSpec) or waits:
        return spec
    capturing = torch.cuda.is_current_stream_capturing()
    if not capturing and ready_kernel_on(device, spec) is not None:
        return spec
    stand_in = stand_in_spec(spec)
    if capturing:
        hopper_loaded = loaded_kernel_on(device, spec) is not None
        return spec if hopper_loaded or loaded_kernel_on(device, stand_in) is None else stand_in
    return stand_in if compile_in_background(device, spec) else spec


def load_kernels(device, spec, schedule: str = "longest_first") -> None:
    """Load ``spec``'s kernel and, for the longest-first schedule, the launch-order kernel, the
    two compiling side by side when neither is cached."""
    if schedule == "index":
        get_kernel_on(device, spec)
        return
    order_spec = LaunchOrderSpec()
    load_in_background(device, order_spec)
    get_kernel_on(device, spec)
    get_kernel_on(device, order_spec)


def order_buckets(lengths: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The longest-first schedule's sort key of each row: its key tiles (of ORDER_TILE_KEYS
    keys; negative lengths count 0), shifted by ``order_shift(kv_len)``, capped at the last
    bucket (rows longer than kv_len share it)."""
    tiles = (lengths.to(torch.int64).clamp_min(0) + ORDER_TILE_KEYS - 1) // ORDER_TILE_KEYS
    return (tiles >> order_shift(kv_len)).clamp_max(ORDER_BUCKETS - 1)


@functools.lru_cache(maxsize=64)
def _encode_rows_map(dtype: torch.dtype, address: int, shape: tuple, strides: tuple, rows: int) -> bytes | None:
    batch, heads, seq, dim = shape
    # A dim of size one gets the stride a contiguous tensor would have (its coordinate is always 0).
    s_s = strides[2] * 2 if seq > 1 else -(-dim * 2 // 16) * 16
    s_h = strides[1] * 2 if heads > 1 else s_s * seq
    s_b = strides[0] * 2 if batch > 1 else s_h * heads
    kind = driver.TENSOR_MAP_BFLOAT16 if dtype == torch.bfloat16 else driver.TENSOR_MAP_FLOAT16
    return driver.encode_tensor_map(kind, address, (dim, seq, heads, batch), (s_s, s_h, s_b), (64, rows, 1, 1))


def rows_tensor_map(t: torch.Tensor, rows: int) -> bytes | None:
    """The tensor map of [B, H, S, D] view ``t`` that loads ``rows`` consecutive rows of one head,
    64 columns at a time, into the kernels' 128-byte-swizzled tiles (columns past D read as
    zeros); None where the driver is not used or refuses the layout (the kernel then gathers)."""
    if not driver.available() or t.stride(3) != 1:
        return None
    return _encode_rows_map(t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()), rows)


def _strides(t: torch.Tensor) -> tuple:
    """Element strides of B, H, S (a dimension of size one contributes nothing)."""
    return tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))


def launch_attention(spec, q, k, v, out, lse, mask: SliceMask, order: torch.Tensor, scale: float) -> None:
    """Run ``spec`` on [B, H, S, D] views q, k, v into ``out`` (and float32 ``lse`` [B, H, q_len]
    or None) over ``mask`` in ``order``; q, k, v already checked against the mask (check_inputs).
    What the kernel writes to and reads raw (out, lse, the mask's offsets) is checked here, the
    one place every caller passes through: the op called directly included."""
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_strides(t, name)
    check_outputs(q, k, v, out, lse)
    check_scale(scale)
    batch, heads, q_len, _ = q.shape
    items = batch * heads * mask.q_blocks
    check_order(order, items, q.device)
    if not (items and q_len):
        if lse is not None:
            lse.fill_(-math.inf)
        return
    fields = {}
    for name, t in (("q", q), ("k", k), ("v", v), ("o", out)):
        fields.update(zip((f"{name}_sb", f"{name}_sh", f"{name}_ss"), _strides(t)))
    if spec.params is ATTN_TMA_PARAMS:
        maps = {"k_map": rows_tensor_map(k, spec.key_tile), "v_map": rows_tensor_map(v, spec.key_tile)}
        fields.update(maps, tma=int(None not in maps.values()))
    # The kernels index the offsets and keys as flat arrays (a mask may hold expanded views); a
    # copy made here is freed in stream order, after the kernel.
    indptr, indices = mask.indptr.contiguous(), mask.indices.contiguous()
    params = spec.params.pack(
        q=q, k=k, v=v, o=out, lse=lse, indptr=indptr, indices=indices, order=order,
        heads=heads, q_blocks=mask.q_blocks, q_len=q_len, kv_len=mask.kv_len, capacity=mask.capacity,
        scale_log2=scale * math.log2(math.e), **fields,
    )
    launch(spec, q.device, (items,), params)


def check_order(order, items: int, device) -> None:
    """The launch order the kernel reads one entry of per CTA: int32, one per (batch, head, query
    block), on the inputs' device (its values are clamped in the kernel)."""
    if not isinstance(order, torch.Tensor) or order.dtype != torch.int32 or order.device != device \
            or order.numel() != items or not order.is_contiguous():
        got = (f"{tuple(order.shape)}, {order.dtype}, {order.device}" if isinstance(order, torch.Tensor)
               else type(order).__name__)
        raise ValueError(f"order must be a contiguous int32 tensor of {items} items (batch x heads x query "
                         f"blocks) on {device}; got {got}")


def check_inputs(q, k, v, mask: SliceMask, spec=None, planned: bool = True) -> None:
    """ValueError/TypeError naming expected and actual for anything the kernel (``spec``) cannot
    take; with no spec (the CPU reference), one of REFERENCE_DTYPES shared by q, k and v. ``planned``:
    whether a plan chose ``spec`` (else it follows q, and the messages say so). Strides are
    checked at launch (``launch_attention``), where tensors are real even inside torch.compile."""
    if spec is None:
        if q.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"q must have one of the dtypes {REFERENCE_DTYPES}, got {q.dtype}")
        expected_dtype, head_dim = q.dtype, q.shape[-1]
    else:
        expected_dtype, head_dim = _DTYPE_BY_NAME[spec.dtype], spec.head_dim
    by_plan = spec is not None and planned
    wants_dtype = f"the plan expects {expected_dtype}" if by_plan else f"q has {expected_dtype}"
    wants_dim = f"the plan was made for {head_dim}" if by_plan else f"q has {head_dim}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != expected_dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, {wants_dtype}")
        if t.device != mask.device:
            raise ValueError(f"{name} is on {t.device}, the mask is on {mask.device}")
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name} has head dim {t.shape[-1]}, {wants_dim}")
    expected_q = (mask.batch, mask.heads, mask.q_len, head_dim)
    expected_kv = (mask.batch, mask.heads, mask.kv_len, head_dim)
    if tuple(q.shape) != expected_q:
        raise ValueError(f"q has [B, H, S, D] shape {tuple(q.shape)}, the mask expects {expected_q}")
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected_kv:
            raise ValueError(f"{name} has [B, H, S, D] shape {tuple(t.shape)}, the mask expects {expected_kv}")


def check_forward_only(q, k, v) -> None:
    """The kernels have no backward pass: refuse to run where autograd would record the call
    (no gradient would reach q, k or v, silently)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("fgcupy attention has no backward pass: call it under torch.no_grad() or "
                           "torch.inference_mode() (diffusers pipelines do), or pass q, k, v detached")


def check_has_kernel(head_dim, slice_m) -> None:
    """ValueError unless an attention kernel takes this head dim and slice size."""
    if head_dim not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim!r} has no attention kernel; available: {ATTENTION_HEAD_DIMS}")
    if slice_m not in SLICE_SIZES:
        raise ValueError(f"mask.slice_m={slice_m} has no compiled kernel; available: {SLICE_SIZES}")


#: The largest scale whose product with log2(e) float32 holds.
_SCALE_MAX = float(torch.finfo(torch.float32).max) / math.log2(math.e)


def eager_scale(scale):
    """A one-element tensor scale as a Python float (read eagerly; a traced op takes a number),
    anything else as given, for check_scale."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.dtype.is_complex:
        if scale.is_meta:
            raise ValueError("scale is a meta tensor: it holds no value (pass a number)")
        if torch.compiler.is_compiling():
            raise TypeError("scale as a tensor cannot be traced by torch.compile (the op takes a float): pass "
                            "a Python number, or None for 1 / sqrt(head dim)")
        return scale.item()
    return scale


def check_scale(scale) -> None:
    """The kernels take the row maximum of unscaled logits, which is the maximum of the scaled
    ones only for a positive scale. While torch.compile traces, the scale may be computed from
    symbolic shapes: it is checked inside the graph."""
    if torch.compiler.is_compiling():
        torch._check(scale > 0, lambda: "scale must be a positive finite number")
        torch._check(scale < math.inf, lambda: "scale must be a positive finite number")
        return
    try:  # the kernels scale by scale x log2(e) in float32
        usable = not isinstance(scale, bool) and isinstance(scale, numbers.Real) and 0 < float(scale) <= _SCALE_MAX
    except OverflowError:  # an int past float's range
        usable = False
    if not usable:
        raise ValueError(f"scale must be a positive finite number up to {_SCALE_MAX:.3g} (or None: 1 / sqrt(head "
                         f"dim)), got {scale!r}")


def check_outputs(q, k, v, out, lse) -> None:
    """``out`` must be q's shape, dtype and device with no two elements in one place, and must
    not overlap k or v (other query blocks still read them while one block writes) nor q other
    than as q itself (in place); ``lse``, where given, contiguous float32 [B, H, q_len] clear of
    out, q, k and v."""
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q: expected shape {tuple(q.shape)}, {q.dtype}, {q.device}; "
                         f"got {tuple(out.shape)}, {out.dtype}, {out.device}")
    if _may_overlap_itself(out):
        raise ValueError(f"out has elements that share memory (strides {out.stride()} for shape {tuple(out.shape)}, "
                         "an expanded or overlapping view): blocks would write over each other's rows")
    in_place = out.data_ptr() == q.data_ptr() and out.stride() == q.stride()
    for name, t in (("k", k), ("v", v)) + ((() if in_place else (("q", q),))):
        if _spans_overlap(out, t) and _may_share_elements(out, t):
            raise ValueError(f"out overlaps {name} in memory: the kernel would overwrite {name} while other "
                             "query blocks still read it; pass a separate out (out=q, in place, is allowed)")
    if lse is not None:
        expected = tuple(q.shape[:3])
        if tuple(lse.shape) != expected or lse.dtype != torch.float32 or lse.device != q.device or not lse.is_contiguous():
            raise ValueError(f"lse must be a contiguous float32 tensor of shape {expected} on {q.device}; got "
                             f"{tuple(lse.shape)}, {lse.dtype}, {lse.device}{'' if lse.is_contiguous() else ', not contiguous'}")
        for name, t in (("out", out), ("q", q), ("k", k), ("v", v)):
            if _spans_overlap(lse, t):  # another dtype: any shared byte is one too many
                raise ValueError(f"lse overlaps {name} in memory: the kernel would write the LSE over {name} "
                                 "while it is read or written; pass a separate lse")


def _may_overlap_itself(t: torch.Tensor) -> bool:
    """False where each dimension's stride clears the span of the dimensions with smaller strides
    (no two elements share an address); True otherwise (expanded views, overlapping windows; a
    few exotic interleavings that do not overlap are refused too)."""
    span = 1  # elements covered by the dimensions taken so far
    for stride, size in sorted((abs(stride), size) for stride, size in zip(t.stride(), t.shape) if size > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def _may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors whose address ranges intersect may hold an element in common. Exact for
    views of one layout moved apart (q, k and v cut from one fused projection: their ranges
    interleave, their elements do not); True for anything else."""
    if a.shape != b.shape or a.stride() != b.stride() or a.element_size() != b.element_size() or _may_overlap_itself(a):
        return True
    gap, rest = divmod(abs(b.data_ptr() - a.data_ptr()), a.element_size())
    if rest:
        return True
    dims = sorted((abs(stride), size) for stride, size in zip(a.stride(), a.shape) if size > 1)

    def reachable(offset: int, upto: int) -> bool:  # offset = sum of c_d * stride_d, |c_d| < size_d?
        if upto == 0:
            return offset == 0
        stride, size = dims[upto - 1]
        inner = sum(s * (n - 1) for s, n in dims[: upto - 1])  # below this dimension's stride
        lowest = -(-(offset - inner) // stride)  # the c whose remainder the inner dims can still reach
        return any(reachable(offset - c * stride, upto - 1)
                   for c in range(max(lowest, -(size - 1)), min(offset // stride + 1, size - 1) + 1)
                   if abs(offset - c * stride) <= inner)

    return reachable(gap, len(dims))


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the address ranges two tensors cover intersect (a conservative test of aliasing).
    By address alone: tensors imported through DLPack (cupy arrays) get storages of their own that
    may still share memory."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_strides(t: torch.Tensor, name: str) -> None:
    """The kernel reads rows with 16-byte copies: unit stride over D, 8-element-aligned rows."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous along the head dim (stride 1), got strides {t.stride()}")
    if any(s % 8 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) or t.data_ptr() % 16:
        raise ValueError(
            f"{name} rows must start on 16-byte boundaries (strides multiple of 8 elements, "
            f"aligned base); got strides {t.stride()}, address {t.data_ptr():#x}"
        )

"""Slice-sparse attention: a plan/run object and a one-shot function.

``plan`` picks and loads the kernel for a mask and prepares the GPU work list (query blocks
ordered longest list first) without synchronising the host; ``run`` checks the inputs and
launches on torch's current stream. One plan serves many diffusion steps; re-planning a mask of
the same shape refills the plan's own buffers in place, so a captured CUDA graph stays valid.
"""

from __future__ import annotations

import contextlib
import math

import torch

from . import bridge
from .attention_kernel import (SCHEDULES, block_order, check_forward_only, check_has_kernel,  # noqa: F401 - public here
                               check_inputs, check_outputs, check_scale, check_strides, eager_scale, load_kernels,
                               runnable_spec)
from .jit import AttentionSpec
from . import ops
from .ops import spec_token
from .jit.spec import ATTENTION_SPEC_CLASSES
from .layout import check_layout, to_bhsd
from .mask import SliceMask, num_blocks, positive_int
from .mask_algebra import drop_keys
from .tiles import config_with, default_config, default_spec  # noqa: F401 - default_* public here since the first release

_INT32_MAX = 2**31 - 1

#: The kernels a plan can run: mma.sync (any sm_80+), wgmma, warp-specialised wgmma (Hopper).
KERNEL_SPECS = tuple(ATTENTION_SPEC_CLASSES.values())


class SparseAttention:
    """Plan once per mask, run per step.

    >>> attn = SparseAttention()
    >>> attn.plan(mask, head_dim=128, dtype=torch.bfloat16)
    >>> out = attn.run(q, k, v)
    """

    def __init__(self):
        self.spec: AttentionSpec | None = None
        self.mask: SliceMask | None = None
        self._indptr = None
        self._indices = None
        self._order = None
        self._chosen_for_caller = False  # plan() picked the kernel: a stand-in may run while it compiles

    # ---- plan ----
    def plan(self, mask: SliceMask, head_dim: int, dtype=torch.bfloat16, key_tile: int | None = None,
             stages: int | None = None, rows_per_warp: int | None = None,
             schedule: str = "longest_first", spec=None) -> "SparseAttention":
        """Choose and load the kernel for ``mask``. With no tile parameter and no ``spec``: the
        tuned kernel for this GPU and shape if ``fgcupy.autotune`` stored one, else
        ``default_spec``. Any of key_tile / stages / rows_per_warp selects the mma.sync kernel,
        the others taking ``tiles.config_with``. ``spec`` (one of ``KERNEL_SPECS``) picks the kernel
        outright. A Hopper kernel picked here (default or tuned) that is not compiled yet has the
        mma.sync kernel of its shape stand in until a thread has compiled it
        (``attention_kernel.runnable_spec``; FGCUPY_STAND_IN=0 waits instead). ``schedule`` orders
        the query blocks:
        "longest_first" (default: long lists start early, so the last wave is short) or "index".

        The mask is copied into the plan's own buffers, so changing ``mask`` afterwards changes
        nothing until the next plan; ``self.mask`` views those buffers, which a later plan of
        the same shape refills (CUDA graphs captured on ``run`` stay valid): copy it to keep it.
        A mask of that shape already written into them (its tensors view ``self.mask``'s) is not
        copied again."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        tile_args = {"key_tile": key_tile, "stages": stages, "rows_per_warp": rows_per_warp}
        if spec is not None and not isinstance(spec, KERNEL_SPECS):
            names = ", ".join(cls.__name__ for cls in KERNEL_SPECS)
            raise TypeError(f"spec must be one of {names}; got {type(spec).__name__}")
        if spec is not None and any(v is not None for v in tile_args.values()):
            given = {k: v for k, v in tile_args.items() if v is not None}
            raise ValueError(f"give either spec or tile parameters, not both (spec={spec.name}, {given})")
        if not isinstance(mask, SliceMask):
            raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
        dtype_name = bridge.dtype_name(dtype, "dtype")
        check_has_kernel(head_dim, mask.slice_m)
        chosen_for_caller = spec is None and key_tile is None and stages is None and rows_per_warp is None
        if chosen_for_caller:
            from . import autotune  # the tuned winner for this GPU and shape, if stored

            spec = autotune.planned_spec(mask, head_dim, dtype_name)
        if spec is None:
            spec = AttentionSpec(dtype_name, head_dim, mask.slice_m, **config_with(head_dim, mask.slice_m, **tile_args))
        elif (spec.dtype, spec.head_dim, spec.slice_m) != (dtype_name, head_dim, mask.slice_m):
            raise ValueError(
                f"spec {spec.name} is for (dtype, head_dim, slice_m)={(spec.dtype, spec.head_dim, spec.slice_m)}, "
                f"the plan asks for {(dtype_name, head_dim, mask.slice_m)}"
            )
        if mask.capacity > _INT32_MAX:
            raise ValueError(f"mask capacity {mask.capacity} exceeds int32 offsets")

        with torch.cuda.device(mask.device) if mask.device.type == "cuda" else contextlib.nullcontext():
            if mask.device.type == "cuda":
                load_kernels(mask.device, runnable_spec(mask.device, spec) if chosen_for_caller else spec, schedule)
            order = block_order(mask, schedule)
            if self._same_shape(mask):
                # In place (a captured CUDA graph keeps reading these), under inference_mode where
                # the buffers were made in it.
                with torch.inference_mode(self._indptr.is_inference()):
                    for own, given in ((self._indptr, mask.indptr), (self._indices, mask.indices)):
                        if given.data_ptr() != own.data_ptr():  # a mask written into the plan's buffers stays
                            own.copy_(given)
                    self._order.copy_(order)
            else:
                self._indptr = mask.indptr.contiguous().clone()
                self._indices = mask.indices.contiguous().clone()
                self._order = order
        self.spec = spec
        self._chosen_for_caller = chosen_for_caller
        self.mask = SliceMask(self._indptr, self._indices, mask.slice_m, mask.q_len, mask.kv_len)
        return self

    def _same_shape(self, mask: SliceMask) -> bool:
        return (
            self._indptr is not None
            and self._indptr.shape == mask.indptr.shape
            and self._indices.shape == mask.indices.shape
            and self._indptr.device == mask.device
        )

    # ---- run ----
    def run(self, q, k, v, scale: float | None = None, layout: str = "HND", out=None,
            return_lse: bool = False, lse=None):
        """Attention of ``q`` over the kept keys of ``k``/``v``.

        q: [B, H, q_len, D] (layout "HND") or [B, q_len, H, D] ("NHD"); k, v likewise with kv_len.
        Returns ``out`` (same type and layout as q), and float32 ``lse`` [B, H, q_len] (natural
        log) if ``return_lse`` or ``lse`` is given. ``out``/``lse`` may be given to write into
        existing buffers.
        Under torch.compile this is one ``torch.ops.fgcupy.sparse_attention_`` call (CUDA graphs
        take it too); eager calls run the same implementation directly.
        """
        if self.spec is None:
            raise RuntimeError("SparseAttention.run called before plan(mask, ...)")
        return _attend(q, k, v, self.mask, self.spec, self._order, scale, layout, out, return_lse, lse,
                       self._chosen_for_caller)


def _check_writable(name: str, tensor) -> None:
    """An output the kernels write in place: not one autograd tracks (the write would go
    unrecorded) nor an inference tensor outside inference mode (torch refuses the write). Traced
    by torch.compile, the op's schema tells autograd of the writes."""
    if tensor is None or torch.compiler.is_compiling():
        return
    if tensor.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the kernels write it in place, which autograd cannot record "
                         "(pass a tensor without requires_grad, or call under torch.no_grad())")
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor, which can only be written inside torch.inference_mode()")


def _attend(q, k, v, mask: SliceMask, spec, order, scale, layout, out, return_lse, lse, chosen_for_caller=False):
    """Check, allocate what is missing, and call the op (``spec`` None: the op picks as plan would;
    ``chosen_for_caller``: plan picked ``spec``, see ops.spec_token)."""
    check_layout(layout)
    returns_cupy = bridge.is_cupy_array(q)
    q_t, k_t, v_t = (bridge.to_torch(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    qh, kh, vh = (to_bhsd(x, layout, name) for x, name in ((q_t, "q"), (k_t, "k"), (v_t, "v")))
    check_forward_only(qh, kh, vh)
    if qh.device.type == "cuda":
        check_inputs(qh, kh, vh, mask, spec or _spec_like(qh, mask), planned=spec is not None)
    else:  # the reference takes any floating dtype, a plan's only
        check_inputs(qh, kh, vh, mask, spec)
    if out is None:
        out_t = torch.empty_like(q_t)
    else:
        out_t = bridge.to_torch(out, "out")
        if out_t.shape != q_t.shape or out_t.dtype != q_t.dtype or out_t.device != q_t.device:
            raise ValueError(
                f"out must match q: expected shape {tuple(q_t.shape)}, {q_t.dtype}, {q_t.device}; "
                f"got {tuple(out_t.shape)}, {out_t.dtype}, {out_t.device}"
            )
    oh = to_bhsd(out_t, layout, "out")
    batch, heads, q_len, head_dim = qh.shape
    if head_dim < 1:
        raise ValueError(f"q, k, v need a head dim of at least 1, got {head_dim}")
    if lse is not None:
        lse = bridge.to_torch(lse, "lse")
        expected = (batch, heads, q_len)
        if tuple(lse.shape) != expected or lse.dtype != torch.float32 or lse.device != qh.device or not lse.is_contiguous():
            raise ValueError(
                f"lse must be a contiguous float32 tensor of shape {expected} on {qh.device}; got "
                f"{tuple(lse.shape)}, {lse.dtype}, {lse.device}{'' if lse.is_contiguous() else ', not contiguous'}"
            )
        return_lse = True
    elif return_lse:
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=qh.device)
    for name, given in (("out", out_t if out is not None else None), ("lse", lse)):
        _check_writable(name, given)
    scale = eager_scale(scale)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)  # symbolic under torch.compile with dynamic shapes
    else:
        check_scale(scale)
    scale = float(scale)
    ops.attend(qh, kh, vh, oh, lse, mask.indptr, mask.indices, order, mask.slice_m, scale,
               spec_token(spec, chosen_for_caller))
    result = bridge.to_cupy(out_t) if returns_cupy else out_t
    if return_lse:
        return result, (bridge.to_cupy(lse) if returns_cupy else lse)
    return result


def _spec_like(q, mask: SliceMask):
    """The default spec of q's dtype and head dim (what input checks compare against)."""
    dtype = bridge.dtype_name(q.dtype, "q")
    check_has_kernel(q.shape[-1], mask.slice_m)
    return default_spec(dtype, q.shape[-1], mask.slice_m)


#: The ``plan`` options ``sparse_attention`` passes on.
PLAN_OPTIONS = ("key_tile", "stages", "rows_per_warp", "schedule", "spec")


def sparse_attention(q, k, v, mask: SliceMask, scale: float | None = None, layout: str = "HND",
                     out=None, return_lse: bool = False, lse=None, **tile):
    """One-shot slice-sparse attention (arguments as ``SparseAttention.run``). With no ``tile``
    option the op picks the kernel as ``plan`` would (and CPU tensors get the reference);
    ``tile`` takes ``plan``'s key_tile, stages, rows_per_warp, schedule and spec. Prefer a
    ``SparseAttention`` object when the same mask serves several calls."""
    check_layout(layout)
    if not isinstance(mask, SliceMask):
        raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
    unknown = sorted(set(tile) - set(PLAN_OPTIONS))
    if unknown:
        raise TypeError(f"sparse_attention() got unexpected keyword argument(s) {unknown}; besides run()'s "
                        f"arguments it takes the plan options {PLAN_OPTIONS}")
    tile = {name: value for name, value in tile.items() if value is not None}  # None: plan's default
    if tile:
        q_t = bridge.to_torch(q, "q")
        if q_t.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"the plan options {sorted(tile)} choose a kernel, which takes bfloat16 or float16; "
                            f"q has {q_t.dtype} (without them CPU tensors of any floating dtype run the reference)")
        plan = SparseAttention().plan(mask, head_dim=q_t.shape[-1], dtype=q_t.dtype, **tile)
        return plan.run(q, k, v, scale=scale, layout=layout, out=out, return_lse=return_lse, lse=lse)
    return _attend(q, k, v, mask, None, None, scale, layout, out, return_lse, lse)


#: Index slices (int32 each) of the full masks one dense_attention_with_lse launch may build.
DENSE_INDEX_BUDGET = 1 << 26


def _heads_per_group(heads, per_head, index_budget) -> int:
    """The most heads (at least one) whose index lists fit ``index_budget``, as a plain int even
    where the lengths are symbolic (torch.compile with dynamic shapes): each comparison becomes a
    guard, where a symbolic group size would reach every index list's shape and inductor fails
    on those."""
    group = 1
    while group < heads and (group + 1) * per_head <= index_budget:
        group += 1
    return group


def dense_attention_with_lse(q, k, v, slice_m: int = 128, key_valid=None, scale: float | None = None,
                             layout: str = "HND", index_budget: int = DENSE_INDEX_BUDGET, **tile):
    """(out, lse): dense attention through the slice kernel (CPU tensors: the reference) and its
    row LSE, float32 [B, H, S], natural log: the dense step whose LSE exact column-max masks
    need. ``key_valid`` (bool [B, KV]) drops padded keys. Heads run in groups whose full index
    lists hold at most ``index_budget`` slices (a 32,760-token head needs 8.4 M). ``tile``: plan
    options, as ``sparse_attention`` takes them."""
    check_layout(layout)
    slice_m, index_budget = positive_int("slice_m", slice_m), positive_int("index_budget", index_budget)
    q_t, k_t, v_t = (bridge.to_torch(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    qh, kh, vh = to_bhsd(q_t, layout, "q"), to_bhsd(k_t, layout, "k"), to_bhsd(v_t, layout, "v")
    if qh.dim() != 4 or kh.shape[:3] != vh.shape[:3] or kh.shape[:2] != qh.shape[:2]:
        raise ValueError(f"q, k, v must be [B, H, S, D] (layout {layout}) with one batch and head count and k, v "
                         f"of one length; got q {tuple(qh.shape)}, k {tuple(kh.shape)}, v {tuple(vh.shape)}")
    batch, heads, q_len, _ = qh.shape
    kv_len = kh.shape[2]
    per_head = batch * num_blocks(q_len, slice_m) * kv_len
    group = _heads_per_group(heads, per_head, index_budget)
    out = torch.empty_like(q_t)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=qh.device)
    head_axis = 1 if layout == "HND" else 2
    masks = {}  # one full mask per group size, shared by the groups
    for h0 in range(0, heads, group):
        h1 = min(heads, h0 + group)
        if h1 - h0 not in masks:
            full = SliceMask.full(batch, h1 - h0, q_len, kv_len, slice_m, device=qh.device)
            masks[h1 - h0] = full if key_valid is None else drop_keys(full, key_valid)
        full = masks[h1 - h0]
        part = [x.narrow(head_axis, h0, h1 - h0) for x in (q_t, k_t, v_t, out)]
        _, part_lse = sparse_attention(*part[:3], full, scale=scale, layout=layout, out=part[3], return_lse=True,
                                       **tile)
        lse[:, h0:h1] = part_lse
    return out, lse

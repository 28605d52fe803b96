"""Exact slice-sparse attention in float32/float64 with torch, on any device.

The yardstick of tests and quality benchmarks: a masked softmax over the kept keys of each
query block, computed in chunks of query blocks so long sequences fit in memory. A query whose
block keeps no key gets a zero output and LSE = -inf.
"""

from __future__ import annotations

import math

import torch

from .attention_kernel import REFERENCE_DTYPES, check_scale, eager_scale
from .layout import to_bhsd
from .mask import SliceMask, positive_int


#: Bytes of scores one pass may hold (every batch entry and head of a chunk of query rows): at
#: full video size 4,096 rows of 40 heads against 32,760 keys would take 21 GB per tensor.
SCORE_BYTES = 1 << 30
#: Score-sized tensors a pass holds at once (scores, the masked ones, the kept map, exponentials).
_PASS_TEMPORARIES = 5


def _rows_per_pass(rows_per_chunk: int, q, kv_len: int, dtype: torch.dtype, multiple: int = 1) -> int:
    """At most ``rows_per_chunk`` query rows, fewer where a pass's scores and their temporaries
    would pass SCORE_BYTES; a multiple of ``multiple`` (whole query blocks), at least one multiple."""
    per_row = max(1, q.shape[0] * q.shape[1] * kv_len * torch.finfo(dtype).bits // 8 * _PASS_TEMPORARIES)
    rows = min(rows_per_chunk, SCORE_BYTES // per_row)
    return max(multiple, rows // multiple * multiple)


def _checked_inputs(q, k, v, layout: str, rows_per_chunk, scale, dtype) -> tuple:
    """(q, k, v as [B, H, S, D] views, the scale as a number): the shapes checked against each
    other (q [B, H, S, D], k and v [B, H, KV, D]: torch would broadcast a batch or head of one, or
    fail deep in a matmul), on one device, of one of REFERENCE_DTYPES (a complex input would lose
    its imaginary part), the scale as the kernels take it, ``dtype`` one of REFERENCE_DTYPES."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (the reference runs torch ops), got {type(t).__name__}")
        if t.dtype not in REFERENCE_DTYPES:
            raise TypeError(f"{name} must have one of the dtypes {REFERENCE_DTYPES}, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    q, k, v = (to_bhsd(t, layout, name) for t, name in ((q, "q"), (k, "k"), (v, "v")))
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be [B, H, S, D] and k, v [B, H, KV, D] with q's B, H and D; got (as HND) "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    positive_int("rows_per_chunk", rows_per_chunk)
    if dtype not in REFERENCE_DTYPES:
        raise TypeError(f"dtype must be one of {REFERENCE_DTYPES}, got {dtype!r}")
    if scale is None:
        return q, k, v, 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, torch.Tensor) and torch.compiler.is_compiling():
        return q, k, v, scale  # torch ops multiply by it: traced as it is
    scale = eager_scale(scale)
    check_scale(scale)
    return q, k, v, scale


def reference_attention(
    q, k, v, mask: SliceMask, scale: float | None = None, layout: str = "HND",
    dtype: torch.dtype = torch.float32, rows_per_chunk: int = 4096,
):
    """Return ``(out, lse)``: out in ``dtype`` and ``layout``, lse float32-or-``dtype`` [B, H, S].
    Query blocks in passes of at most ``rows_per_chunk`` rows, fewer where their scores would
    pass SCORE_BYTES."""
    q, k, v, scale = _checked_inputs(q, k, v, layout, rows_per_chunk, scale, dtype)
    if not isinstance(mask, SliceMask):
        raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    if (mask.batch, mask.heads, mask.q_len, mask.kv_len) != (batch, heads, q_len, kv_len):
        raise ValueError(
            f"mask is for (B, H, q_len, kv_len)={(mask.batch, mask.heads, mask.q_len, mask.kv_len)}, "
            f"inputs are {(batch, heads, q_len, kv_len)}"
        )
    keep = mask.to(q.device).to_dense()  # [B, H, QB, KV]
    out = torch.zeros(batch, heads, q_len, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((batch, heads, q_len), -math.inf, dtype=dtype, device=q.device)
    kf, vf = k.to(dtype), v.to(dtype)
    finite_values = bool(torch.isfinite(vf).all())  # else a dropped key's value may not spread
    blocks_per_chunk = _rows_per_pass(rows_per_chunk, q, kv_len, dtype, mask.slice_m) // mask.slice_m
    for first in range(0, mask.q_blocks, blocks_per_chunk):
        last = min(first + blocks_per_chunk, mask.q_blocks)
        rows = slice(first * mask.slice_m, min(last * mask.slice_m, q_len))
        qf = q[:, :, rows].to(dtype)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        row_block = torch.arange(rows.start, rows.stop, device=q.device) // mask.slice_m - first  # real rows only
        row_keep = keep[:, :, first:last].index_select(2, row_block)
        scores = scores.masked_fill(~row_keep, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)
        # A query whose block keeps no key gets zeros (its LSE is -inf); NaN inputs stay NaN.
        empty = torch.isneginf(row_lse).unsqueeze(-1)
        probs = torch.where(empty, 0.0, torch.exp(scores - torch.where(empty, 0.0, row_lse.unsqueeze(-1))))
        out[:, :, rows] = _kept_values(probs, row_keep, vf, finite_values)
        lse[:, :, rows] = row_lse
    if layout == "NHD":
        out = out.transpose(1, 2)
    return out, lse


def _kept_values(probs, row_keep, v, finite: bool):
    """probs @ v [B, H, rows, D], where a dropped key adds nothing even if its value row holds
    inf or NaN (0 x NaN is NaN; the kernels never read a dropped key's value). Kept keys'
    non-finite values add p x v as IEEE arithmetic has it: NaN where a kept key's value is NaN,
    or infinite with p = 0, or where infinities of both signs meet; else that infinity.
    ``finite``: whether every value is (then one product). Else four more products of the
    probabilities with indicator matrices, so no loop over keys."""
    if finite:
        return torch.matmul(probs, v)
    out = torch.matmul(probs, v.nan_to_num(0.0, 0.0, 0.0))  # the finite entries; NaN for a NaN query

    def reached(weights, entries):
        return torch.matmul(weights.to(probs.dtype), entries.to(probs.dtype)) > 0

    positive, zero = row_keep & (probs > 0), row_keep & (probs == 0)
    nan = out.isnan() | reached(row_keep, v.isnan()) | reached(zero, v.isinf())
    plus, minus = reached(positive, v.isposinf()), reached(positive, v.isneginf())
    out = torch.where(plus, math.inf, torch.where(minus, -math.inf, out))
    return torch.where(nan | (plus & minus), math.nan, out)


def dense_attention(q, k, v, scale: float | None = None, layout: str = "HND", dtype=torch.float32,
                    rows_per_chunk: int = 4096):
    """Full (unmasked) attention in ``dtype``: the quality baseline of sparse results (query rows in
    passes as ``reference_attention``'s)."""
    q, k, v, scale = _checked_inputs(q, k, v, layout, rows_per_chunk, scale, dtype)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    kf, vf = k.to(dtype), v.to(dtype)
    rows_per_pass = _rows_per_pass(rows_per_chunk, q, k.shape[2], dtype)
    for first in range(0, q.shape[2], rows_per_pass):
        rows = slice(first, first + rows_per_pass)
        scores = torch.matmul(q[:, :, rows].to(dtype), kf.transpose(-1, -2)) * scale
        out[:, :, rows] = torch.matmul(torch.softmax(scores, dim=-1), vf)
    return out if layout == "HND" else out.transpose(1, 2)


def relative_l2(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64, of tensors of one shape; NaN where either holds a NaN or
    an infinity (no error can be read then); ‖out‖ where ref is all zeros."""
    for name, x in (("out", out), ("ref", ref)):
        if not isinstance(x, torch.Tensor):
            hint = " (reference_attention returns (out, lse): take its [0])" if isinstance(x, tuple) else ""
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"out and ref must have one shape, got {tuple(out.shape)} and {tuple(ref.shape)}")
    complex_input = out.is_complex() or ref.is_complex()
    out, ref = (x.to(torch.complex128 if complex_input else torch.float64) for x in (out, ref))
    denom, size = float(torch.linalg.vector_norm(ref)), float(torch.linalg.vector_norm(out))
    if not (math.isfinite(denom) and math.isfinite(size)):
        return math.nan
    return float(torch.linalg.vector_norm(out - ref) / denom) if denom > 0 else size

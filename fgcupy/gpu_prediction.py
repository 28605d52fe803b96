"""The GPU pipeline of a mask prediction (score, select, emit; chunked over heads) and the
torch reference it must match, both from a checked ``MaskRequest``."""

from __future__ import annotations

import torch

from . import bridge
from . import mask_reference as ref
from .jit.launch import GRID_LIMITS
from .jit.plan_spec import LaunchOrderSpec
from .jit.runtime import device_arch, device_index, kernel_at_hand, load_in_background
from .jit.score_spec import DILATE_MAX_RADIUS, DilateInPlaceSpec, DilateSpec, EmitSpec
from .attention_kernel import stand_in_spec
from .device_constants import device_constant
from .jit.spec import ATTENTION_HEAD_DIMS, HEAD_DIMS, SLICE_SIZES, AttentionSpec
from .mask import SliceMask, indptr_from_counts, num_blocks
from .mask_kernels import (SCORE_DTYPES, band_specs, bit_words, colmax_warps, gpu_adaptive_rows,
                           gpu_candidate_colmax, gpu_colmax, gpu_colmax_e4m3, gpu_dilate, gpu_dilate_in_place, gpu_emit,
                           gpu_refine_band, gpu_scores, gpu_select, row_stride, scores_spec, select_spec)
from .mask_request import MaskRequest, e4m3_runs_for
from .tiles import default_spec

DEFAULT_WORKSPACE = 2 << 30
_INT32_MAX = 2**31 - 1


def predict_reference(qh, kh, req: MaskRequest, lse, candidates: tuple = ()) -> SliceMask:
    return ref.predict_mask_reference(
        qh, kh, req.slice_m, req.method, rule=req.rule, top_k=req.top_k, tau=req.tau, threshold=req.threshold,
        pool=req.pool, combine=req.combine, min_keys=req.min_keys, max_keys=req.max_keys, local=req.local,
        lse=lse, scale=req.scale, logits_dtype=req.logits_dtype, exact_band=req.exact_band, pooling=req.pooling,
        diagonals=req.diagonals, candidates=candidate_keys(candidates), products=req.products)


def uses_e4m3(req: MaskRequest, qh) -> bool:
    """Whether a colmax prediction on the GPU multiplies e4m3 (products "e4m3", or "auto" where
    the kernel runs)."""
    return req.products == "e4m3" or (req.products == "auto" and e4m3_runs_for(qh))


def candidate_keys(candidates: tuple):
    """bool [B, H, QB, S]: the keys any of the SliceMasks ``candidates`` keeps (None if none)."""
    if not candidates:
        return None
    keys = candidates[0].to_dense()
    for mask in candidates[1:]:
        keys |= mask.to_dense()
    return keys


def row_counts(q_blocks: int, kv_len: int, slice_m: int, top_k: int, min_keys: int, max_keys: int | None,
               local: int | None) -> list:
    """Kept keys of each block under top-k, from the shapes alone (plain ints, so fake tensors
    for torch.compile can use it): clamp(k, max(min_keys, band size), max_keys)."""
    cap = kv_len if max_keys is None else min(max_keys, kv_len)
    counts = []
    for j in range(q_blocks):
        band = 0
        if local is not None:
            lo = min(max(j * slice_m - local, 0), kv_len)
            band = max(min(max((j + 1) * slice_m + local, 0), kv_len), lo) - lo
        low = min(max(band, min_keys), kv_len)
        counts.append(min(max(low, top_k), max(low, cap)))
    return counts


def kept_slices(q_blocks, kv_len, slice_m: int, top_k, min_keys: int, max_keys: int | None,
                local: int | None):
    """Sum of ``row_counts`` over the blocks. Without ``local`` every block keeps the same count,
    so the sum is one product, symbolic where the sizes are (torch.compile with dynamic shapes
    then compiles once for every sequence length instead of once per block count)."""
    if local is not None:
        return sum(row_counts(q_blocks, kv_len, slice_m, top_k, min_keys, max_keys, local))
    low = torch.sym_min(min_keys, kv_len)
    cap = kv_len if max_keys is None else torch.sym_min(max_keys, kv_len)
    return q_blocks * torch.sym_min(torch.sym_max(low, top_k), torch.sym_max(low, cap))


def static_row_counts(q_blocks: int, kv_len: int, req: MaskRequest, device="cpu") -> torch.Tensor:
    """int64 [QB]: ``row_counts`` of a top-k request."""
    counts = row_counts(q_blocks, kv_len, req.slice_m, req.top_k, req.min_keys, req.max_keys, req.local)
    return torch.tensor(counts, dtype=torch.int64, device=device)


def _static_layout(batch: int, heads: int, q_blocks: int, kv_len: int, req: MaskRequest, device: str):
    """(int32 offsets of every block, int32 indptr [B, H, QB + 1], capacity) of a top-k mask:
    known from the shapes, so repeated predictions (every layer, every step) reuse them; made
    once per shape and what the counts depend on (not the scale or the scoring) and kept
    (fgcupy.device_constants: a captured CUDA graph keeps reading the offsets)."""
    key = ("top-k layout", batch, heads, q_blocks, kv_len, req.slice_m, req.top_k, req.min_keys, req.max_keys,
           req.local)
    return device_constant(key, device, lambda on: _layout_of_counts(batch, heads, q_blocks, kv_len, req, on))


def _layout_of_counts(batch: int, heads: int, q_blocks: int, kv_len: int, req: MaskRequest, device):
    per_block = torch.tensor(row_counts(q_blocks, kv_len, req.slice_m, req.top_k, req.min_keys, req.max_keys,
                                        req.local), dtype=torch.int64)
    per_head = int(per_block.sum())
    capacity = per_head * batch * heads
    if capacity > _INT32_MAX:
        raise ValueError(f"the mask would keep {capacity} slices, more than int32 offsets address")
    indptr = indptr_from_counts(per_block.repeat(batch * heads), batch, heads, q_blocks)
    offsets = indptr[..., :-1].reshape(-1)  # every block's start
    return offsets.to(device), indptr.to(device), capacity


def attention_kernels_ahead(dtype: str, head_dim: int, slice_m: int, device) -> list:
    """The attention kernels a predicted mask most likely meets next: the untuned default for
    its dtype, head dim and slice size on this GPU, the mma.sync kernel that stands in for it
    where that is a Hopper kernel not yet compiled here (attention_kernel.runnable_spec), and the
    launch-order kernel. Loaded ahead with the prediction's own, a cold first sparse step waits
    for no attention compile after its prediction (a tuned kernel, where one is stored, is the
    plan's to load)."""
    if head_dim not in ATTENTION_HEAD_DIMS or slice_m not in SLICE_SIZES:
        return []
    default = default_spec(dtype, head_dim, slice_m, device_arch(device_index(device)))
    cold = not isinstance(default, AttentionSpec) and not kernel_at_hand(device, default)
    return [default, *([stand_in_spec(default)] if cold else []), LaunchOrderSpec()]


def colmax_kernels(dtype: str, head_dim: int, slice_m: int, kv_len: int | None, rule: str, device) -> list:
    """The kernels of an exact column-max prediction of these shapes (``predict_mask(method=
    "colmax", lse=..., rule=rule)``): its max-probability pass over every query and, where the
    keys' count is known, its selection (and, but for top-k, the emit). Loaded ahead of the dense
    call whose LSE the prediction waits for, their cold compiles overlap that call's."""
    if head_dim not in HEAD_DIMS or slice_m not in SLICE_SIZES:
        return []
    specs = [scores_spec("maxprob", dtype, head_dim, group=slice_m, warps=colmax_warps(slice_m), device=device)]
    if kv_len is not None:
        specs.append(select_spec(device, row_stride(kv_len, ref.PROB_DTYPE.itemsize), SCORE_DTYPES[ref.PROB_DTYPE], rule))
    return specs if rule == "topk" or kv_len is None else specs + [EmitSpec()]


class GpuPrediction:
    """Chunked over (batch x head): score, select, emit; then one SliceMask."""

    def __init__(self, qh, kh, req: MaskRequest, lse, workspace_bytes: int, candidates: tuple = ()):
        self.qh, self.kh, self.req, self.lse, self.candidates = qh, kh, req, lse, candidates
        self.batch, self.heads, self.q_len, self.dim = qh.shape
        self.kv_len = kh.shape[2]
        self.workspace_bytes = workspace_bytes
        self.bh = self.batch * self.heads
        self.q_blocks = num_blocks(self.q_len, req.slice_m)
        kind = req.kind
        stored = req.logits_dtype if kind in ("mean", "union") else ref.PROB_DTYPE
        self.itemsize = stored.itemsize
        self.ld = row_stride(self.kv_len, self.itemsize)
        self.device = qh.device
        # Static: sizes known from the shapes (top-k with one selection per block), fused emit, no sync.
        self.static = req.rule == "topk" and kind != "union"
        dtype = bridge.dtype_name(qh.dtype, "q")
        for spec in self._later_kernels(dtype, SCORE_DTYPES[stored]) + attention_kernels_ahead(
                dtype, self.dim, req.slice_m, self.device):
            load_in_background(self.device, spec)
        # Rows scored against every key: the queries (colmax), each sub-block's mean query or its
        # middle query (pooling "mean" / "sample", per block for "adaptive", whose sampled blocks'
        # score rows are dilated); "both" keeps the middle queries in samples.
        samples, self.sampled = None, None
        if req.pooling in ("sample", "both"):
            samples = qh.index_select(2, ref.sample_rows(self.q_len, req.pool, qh.device)).contiguous()
        if kind == "colmax":
            self.rows = qh
        elif req.pooling == "sample":
            self.rows = samples
        elif req.pooling == "adaptive":
            fused = gpu_adaptive_rows(qh, req.pool, req.slice_m)
            rows, sampled = fused if fused is not None else ref.adaptive_rows(qh, req.pool, req.slice_m)
            self.rows, self.sampled = rows.contiguous(), sampled.reshape(self.bh * self.q_blocks)
        else:
            self.rows = ref.pool_queries(qh, req.pool).to(qh.dtype).contiguous()
        self.samples = samples if req.pooling == "both" else None
        self.sub_rows = self.rows.shape[2]
        # Score buffers alive at once per head: the block scores and, sampled, the raw sampled scores.
        buffers = {"mean": 1, "sample": 2, "both": 2, "adaptive": 1}[req.pooling]
        per_head = self.sub_rows if kind in ("mean", "union") else self.q_blocks * buffers
        # Heads per chunk: as many as the workspace holds, at most a grid's z (one head each).
        self.chunk = max(1, min(self.bh, GRID_LIMITS[2], workspace_bytes // max(1, per_head * self.ld * self.itemsize)))
        self.capped = req.max_keys is not None and kind != "union"

    def _later_kernels(self, dtype: str, scores: str) -> list:
        """The kernels of the passes after the first, which start loading (compiling, when not
        cached) on threads as the prediction begins: a cold first prediction then waits for its
        slowest compile rather than for the sum of them."""
        req, dim, device = self.req, self.dim, self.device
        specs = [select_spec(device, self.ld, scores, req.rule)]
        if not self.static:
            specs.append(EmitSpec())
        if req.kind == "submax":
            specs += [scores_spec("stats", dtype, dim, warps=8, device=device),
                      scores_spec("maxprob", dtype, dim, group=req.group, warps=8, device=device)]
            if req.pool // 2 <= DILATE_MAX_RADIUS and req.pooling != "mean":
                specs.append(DilateInPlaceSpec() if req.pooling == "adaptive" else DilateSpec())
            if req.exact_band is not None:
                specs += band_specs(dtype, dim, req.slice_m, device)
        return specs

    def run(self) -> SliceMask:
        with torch.cuda.device(self.device):
            if self.static:
                return self._run_static()
            return self._run_dynamic()

    # ---- scores of one chunk: (vals [n, R, ld], lse or None) ----
    def _scores(self, bh0, nbh):
        req, kind = self.req, self.req.kind
        if kind in ("mean", "union"):
            # 8 warps (128 rows per CTA) read K half as often: 0.85 vs 0.97 ms on wan14b-480p (H100).
            mode = "logits_f16" if req.logits_dtype == torch.float16 else "logits"
            return gpu_scores(mode, self.rows, self.kh, req.scale, bh0=bh0, nbh=nbh, warps=8)
        if kind == "submax":
            return self._pooled_scores(bh0, nbh), None
        lse = self.lse.reshape(self.bh, self.q_len)[bh0 : bh0 + nbh]
        if self.candidates:
            # Each candidate mask's lists write their keys' scores; a key listed twice gets the same score.
            scores = torch.zeros(nbh, self.q_blocks, self.ld, dtype=ref.PROB_DTYPE, device=self.device)
            for mask in self.candidates:
                gpu_candidate_colmax(self.rows, self.kh, req.scale, lse, mask, scores, bh0=bh0, nbh=nbh)
            return scores, None
        colmax = gpu_colmax_e4m3 if uses_e4m3(req, self.qh) else gpu_colmax
        return colmax(self.rows, self.kh, req.scale, lse, req.slice_m, bh0=bh0, nbh=nbh), None

    def _pooled_scores(self, bh0, nbh):
        """mask_reference.pooled_scores of one chunk of heads: [nbh, QB, ld] bfloat16."""
        req = self.req
        scores, sub_lse = self._raw_scores(self.rows, bh0, nbh)
        if req.pooling == "sample":
            scores = gpu_dilate(scores, req.pool // 2, self.kv_len)
        elif req.pooling == "both":  # the geometric mean, written into the mean rows' scores
            gpu_dilate(self._raw_scores(self.samples, bh0, nbh)[0], req.pool // 2, self.kv_len, mul=scores)
        elif req.pooling == "adaptive":
            blocks = slice(bh0 * self.q_blocks, (bh0 + nbh) * self.q_blocks)
            gpu_dilate_in_place(scores, req.pool // 2, self.kv_len, self.sampled[blocks])
        if req.exact_band is not None:
            self._refine_band(scores, sub_lse, bh0, nbh)
        return scores

    def _raw_scores(self, rows, bh0, nbh):
        """(max-prob scores [nbh, QB, ld], LSE [nbh, R]) of one chunk of heads' pooled rows."""
        req = self.req
        # 8 warps (128 rows per CTA): K is read half as often as with 4. The LSE is
        # ref.sampled_lse's: a stats pass over a strided view of the keys.
        sampled, log_factor = ref.lse_key_sample(self.kh)
        sub_lse = gpu_scores("stats", rows, sampled, req.scale, bh0=bh0, nbh=nbh, warps=8)
        if log_factor:
            sub_lse += log_factor
        scores = gpu_scores("maxprob", rows, self.kh, req.scale, bh0=bh0, nbh=nbh, lse=sub_lse, group=req.group,
                            warps=8)
        return scores, sub_lse

    def _refine_band(self, scores, sub_lse, bh0, nbh):
        """Exact column maxima on each block's band and on the band moved by each diagonal
        (mask_reference.refine_band), in place."""
        req = self.req
        for shift in (0, *req.diagonals):
            band = (shift - req.exact_band, req.slice_m + 2 * req.exact_band)
            gpu_refine_band(self.qh, self.kh, req.scale, sub_lse, req.pool, req.slice_m, band, scores, bh0=bh0,
                            nbh=nbh)

    def _chunks(self):
        """Yield (bh0, nbh, scores, lse) for each chunk of heads the workspace holds."""
        for bh0 in range(0, self.bh, self.chunk):
            nbh = min(self.chunk, self.bh - bh0)
            vals, lse = self._scores(bh0, nbh)
            yield bh0, nbh, vals, lse

    def _run_static(self) -> SliceMask:
        offsets, indptr, capacity = _static_layout(self.batch, self.heads, self.q_blocks, self.kv_len, self.req,
                                                   str(self.device))
        counts = torch.empty(self.bh * self.q_blocks, dtype=torch.int32, device=self.device)
        indices = torch.empty(capacity, dtype=torch.int32, device=self.device)
        for bh0, nbh, vals, lse in self._chunks():
            rows = slice(bh0 * self.q_blocks, (bh0 + nbh) * self.q_blocks)
            gpu_select(vals, self.kv_len, self.req, lse=lse, band=self.req.local, offsets=offsets[rows],
                       out=indices, counts=counts[rows])
            del vals, lse
        return SliceMask(indptr.clone(), indices, self.req.slice_m, self.q_len, self.kv_len)

    def _run_dynamic(self) -> SliceMask:
        """Select every chunk into bitmasks and counts, then size the index buffer (one host
        sync, none with max_keys) and emit every chunk into it. Where every chunk's bitmasks
        together would outgrow the workspace, each chunk is emitted before the next is scored
        instead (``_emit_each_chunk``)."""
        if self.chunk < self.bh and self.bh * self._bits_bytes_per_head() > self.workspace_bytes:
            return self._emit_each_chunk()
        req = self.req
        indices = self._capped_buffer()
        sub_rows, group, add_band = self._emit_shape()
        chunks = []  # (first block row, counts, bitmask)
        for bh0, nbh, vals, lse in self._chunks():
            counts, bits = self._select(vals, lse, nbh)
            del vals, lse  # the emit reads only the bitmasks
            chunks.append((bh0 * self.q_blocks, counts, bits))
        all_counts = torch.cat([counts for _, counts, _ in chunks])
        # Everything that needs no buffer size is queued before the sync, so that after it only
        # the allocation and the emit launches remain (the GPU idles from the sync until then).
        indptr = indptr_from_counts(all_counts, self.batch, self.heads, self.q_blocks)
        offsets = indptr[..., :-1].reshape(-1)
        if indices is None:
            indices = torch.empty(_checked_total(all_counts), dtype=torch.int32, device=self.device)  # one host sync
        for row0, counts, bits in chunks:
            gpu_emit(bits, self.kv_len, sub_rows, group, req.slice_m, counts, add_band=add_band,
                     offsets=offsets[row0 : row0 + counts.numel()], out=indices)
        return SliceMask(indptr, indices, req.slice_m, self.q_len, self.kv_len)

    def _emit_each_chunk(self) -> SliceMask:
        """_run_dynamic holding one chunk's bitmasks at a time: each chunk's keys are written
        before the next chunk is scored, into the max_keys buffer at offsets summed on the device,
        or else into a buffer of its own sized by a host sync per chunk (joined at the end)."""
        req = self.req
        indices = self._capped_buffer()
        sub_rows, group, add_band = self._emit_shape()
        all_counts, parts, written = [], [], 0
        start = torch.zeros(1, dtype=torch.int64, device=self.device)  # keys written before this chunk
        for _, nbh, vals, lse in self._chunks():
            counts, bits = self._select(vals, lse, nbh)
            del vals, lse
            ends = torch.cumsum(counts.to(torch.int64), 0)
            if indices is None:
                part = torch.empty(_checked_total(counts), dtype=torch.int32, device=self.device)
                written += part.numel()
                if written > _INT32_MAX:
                    raise ValueError("the mask keeps more slices than int32 offsets address")
                offsets, out = (ends - counts).to(torch.int32), part
                parts.append(part)
            else:
                offsets, out = (start + ends - counts).to(torch.int32), indices
                start = start + ends[-1:]
            gpu_emit(bits, self.kv_len, sub_rows, group, req.slice_m, counts, add_band=add_band, offsets=offsets,
                     out=out)
            del bits
            all_counts.append(counts)
        all_counts = torch.cat(all_counts)
        if indices is None:
            indices = torch.cat(parts)
        indptr = indptr_from_counts(all_counts, self.batch, self.heads, self.q_blocks)
        return SliceMask(indptr, indices, req.slice_m, self.q_len, self.kv_len)

    def _emit_shape(self) -> tuple:
        """(bitmask rows per head, rows per emitted block, band added at the emit) of the dynamic path."""
        if self.req.kind == "union":
            return self.sub_rows, self.req.group, self.req.local
        return self.q_blocks, 1, None

    def _bits_bytes_per_head(self) -> int:
        return self._emit_shape()[0] * bit_words(self.kv_len) * 4

    def _capped_buffer(self):
        """The index buffer of max_keys per block (no host sync sizes it), or None."""
        if not self.capped:
            return None
        total = min(self.req.max_keys, self.kv_len) * self.bh * self.q_blocks
        if total > _INT32_MAX:
            raise ValueError(f"max_keys={self.req.max_keys} x {self.bh * self.q_blocks} blocks exceeds int32 offsets")
        return torch.empty(total, dtype=torch.int32, device=self.device)

    def _select(self, vals, lse, nbh) -> tuple:
        """(int32 kept keys per block, bitmask rows) of one chunk's scores."""
        req = self.req
        if req.kind == "union":
            _, bits = gpu_select(vals, self.kv_len, req, lse=lse, band=None, bits=True)
            counts = torch.empty(nbh * self.q_blocks, dtype=torch.int32, device=self.device)
            gpu_emit(bits, self.kv_len, self.sub_rows, req.group, req.slice_m, counts, add_band=req.local)
            return counts, bits
        return gpu_select(vals, self.kv_len, req, lse=lse, band=req.local, bits=True)


def _checked_total(counts: torch.Tensor) -> int:
    """The sum of ``counts`` (a host sync), refused past int32 offsets."""
    used = int(counts.sum(dtype=torch.int64).item())
    if used > _INT32_MAX:
        raise ValueError("the mask keeps more slices than int32 offsets address")
    return used

"""Mask prediction: score (cuda_src/mask_score.cu) and select (mask_select.cu) into a SliceMask.

Methods (DESIGN.md §2):
  "topk" / "tau" / "threshold": mean-query scoring. Each query block's mean query (or, with
      ``pool`` < slice_m, each sub-block's) against every key; selection by top-k, by the
      smallest set holding a fraction tau of the softmax mass, or by probability >= threshold.
      Sub-blocks are combined by ``combine="max"`` (max over sub-blocks of their softmax
      probabilities, then one selection per block) or ``"union"`` (one selection per
      sub-block, union per block).
  "colmax": exact column-max scores from a dense step's row LSE (``lse`` [B, H, S], natural
      log, as ``SparseAttention.run(..., return_lse=True)`` gives): score(block, key) = max over
      the block's queries of their probability; selection by ``rule`` (default threshold,
      0.5 / kv_len). Tiled on the GPU; the S x S matrix is never stored.
Every selection can keep at least ``min_keys``, at most ``max_keys`` keys per block, and the
block's diagonal band (its own keys and ``local`` more on either side), which is ranked first
(it counts toward k and toward the mass). Exact definitions: fgcupy.mask_reference.

Mean-query logits for top-k and threshold are stored as float16 between scoring and selection
by default (``logits_dtype``): half the memory traffic of float32 (see README for the times),
and the selection is exact on the stored values: rounding moves a logit by at most 2^-11 of
its size, so only keys that nearly tie (or sit at the threshold) can change sides, and a logit
beyond +-65504 becomes +-inf (ranked first or last, ties by index; kept or dropped by a
threshold). Tau keeps float32 logits by default, since its masses would be meaningless past
float16's range; ``logits_dtype`` chooses either explicitly. Probabilities (colmax, pooled
max) are always float32.

Host synchronisation: none for top-k with combine "max" (row sizes are known from the
shapes); the other selections need one (in all) to size the index buffer unless ``max_keys``
is given. Score buffers ([heads x rows x kv_len], rows padded to 128 bytes) are bounded by
``workspace_bytes``: heads are processed in chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from . import bridge
from . import mask_reference as ref
from .layout import check_layout, to_bhsd
from .mask import SliceMask, num_blocks
from .mask_kernels import RULE_IDS, gpu_emit, gpu_scores, gpu_select, row_stride

METHODS = ("topk", "tau", "threshold", "colmax")
COMBINES = ("max", "union")
#: Slice sizes the exact band takes (one query block per scoring CTA of 4 or 8 warps).
EXACT_BAND_SLICES = (64, 128)
#: The shipped default of mean-query methods (combine "max", slice_m 64 or 128): sub-blocks of
#: DEFAULT_POOL queries, and exact scores on DEFAULT_EXACT_BAND keys either side of each block
#: (README "Mask quality" has the measurements behind them).
DEFAULT_POOL = 32
DEFAULT_EXACT_BAND = 64
#: Marks an option left to the default (None means "off" for exact_band).
AUTO = "auto"
DEFAULT_WORKSPACE = 2 << 30
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class MaskRequest:
    """Validated parameters of one prediction."""

    method: str
    rule: str
    slice_m: int
    pool: int
    combine: str
    top_k: int | None
    tau: float | None
    threshold: float | None
    min_keys: int
    max_keys: int | None
    local: int | None
    scale: float
    logits_dtype: torch.dtype = torch.float32
    exact_band: int | None = None

    @property
    def kind(self) -> str:
        """mean (one pooled row per block), submax, union, or colmax."""
        if self.method == "colmax":
            return "colmax"
        if self.exact_band is not None:
            return "submax"
        if self.pool == self.slice_m:
            return "mean"
        return "submax" if self.combine == "max" else "union"

    @property
    def group(self) -> int:
        return self.slice_m // self.pool


def predict_mask(q, k, slice_m: int = 128, method: str = "topk", *, density: float | None = None,
                 top_k: int | None = None, tau: float | None = None, threshold: float | None = None,
                 rule: str | None = None, pool=AUTO, combine: str = "max", min_keys: int = 0,
                 max_keys: int | None = None, local: int | None = None, lse=None, scale: float | None = None,
                 logits_dtype: torch.dtype | None = None, exact_band=AUTO, layout: str = "HND",
                 workspace_bytes: int = DEFAULT_WORKSPACE) -> SliceMask:
    """Predict which slices to keep for ``q`` attending to ``k``; returns a SliceMask on q's device.

    q, k: [B, H, S, D] ("HND") or [B, S, H, D] ("NHD"), torch or cupy; CUDA tensors run the
    kernels (bf16/fp16), CPU tensors the torch reference. ``density`` is top-k as a fraction
    of kv_len. ``tau`` defaults to 0.9; ``threshold`` to 0.5 / kv_len for colmax.
    ``logits_dtype``: how mean-query logits are stored, torch.float16 (default for top-k and
    threshold) or torch.float32 (default for tau); see the module docstring.
    ``pool``: queries per pooled sub-block (slice_m: one mean query per block).
    ``exact_band``: keys within this many of the block (either side) get their exact column-max
    score instead of the pooled one (slice_m 64 or 128, combine "max"; None: off; see
    mask_reference). Left as "auto", mean-query methods with combine "max" and slice_m 64 or
    128 use pool=DEFAULT_POOL and exact_band=DEFAULT_EXACT_BAND; other calls use one mean query
    per block and no band.
    """
    check_layout(layout)
    qt, kt = bridge.to_torch(q, "q"), bridge.to_torch(k, "k")
    qh, kh = to_bhsd(qt, layout), to_bhsd(kt, layout)
    if qh.shape[0] != kh.shape[0] or qh.shape[1] != kh.shape[1] or qh.shape[3] != kh.shape[3]:
        raise ValueError(f"q and k must agree on B, H and D ([B, H, S, D]); got {tuple(qh.shape)} and {tuple(kh.shape)}")
    if qh.device != kh.device:
        raise ValueError(f"q is on {qh.device} but k on {kh.device}")
    if qh.shape[2] < 1 or kh.shape[2] < 1:
        raise ValueError(f"q and k need at least one token, got q_len={qh.shape[2]}, kv_len={kh.shape[2]}")
    req = make_request(qh.shape[3], kh.shape[2], slice_m, method, density=density, top_k=top_k, tau=tau,
                       threshold=threshold, rule=rule, pool=pool, combine=combine, min_keys=min_keys,
                       max_keys=max_keys, local=local, scale=scale, logits_dtype=logits_dtype,
                       exact_band=exact_band)
    lse_t = None
    if lse is not None and method != "colmax":
        raise ValueError(f"lse applies to method='colmax' (scores from a dense step), not {method!r}")
    if method == "colmax":
        if lse is None:
            raise ValueError("method='colmax' needs lse: the float32 [B, H, q_len] row LSE of a dense step")
        lse_t = bridge.to_torch(lse, "lse")
        expected = (qh.shape[0], qh.shape[1], qh.shape[2])
        if tuple(lse_t.shape) != expected or lse_t.dtype != torch.float32 or lse_t.device != qh.device:
            raise ValueError(f"lse must be float32 {expected} on {qh.device}; got {tuple(lse_t.shape)}, "
                             f"{lse_t.dtype}, {lse_t.device}")
    if qh.device.type == "cuda":
        bridge.dtype_name(qh.dtype, "q")
        if kh.dtype != qh.dtype:
            raise TypeError(f"k has dtype {kh.dtype}, q has {qh.dtype}")
    if req.rule == "topk" and req.kind in ("mean", "submax") and workspace_bytes == DEFAULT_WORKSPACE:
        # Sizes known from the shapes: one custom op (fgcupy.ops, registered when the package
        # loads), which torch.compile and CUDA graphs take.
        indptr, indices = torch.ops.fgcupy.predict_topk(
            qh, kh, req.slice_m, req.top_k, req.pool, -1 if req.exact_band is None else req.exact_band,
            req.min_keys, -1 if req.max_keys is None else req.max_keys, -1 if req.local is None else req.local,
            req.scale, req.logits_dtype == torch.float16)
        return SliceMask(indptr, indices, req.slice_m, qh.shape[2], kh.shape[2])
    if qh.device.type != "cuda":
        return _predict_reference(qh, kh, req, lse_t)
    return _GpuPrediction(qh, kh, req, lse_t, workspace_bytes).run()


def make_request(head_dim, kv_len, slice_m, method, *, density=None, top_k=None, tau=None, threshold=None,
                 rule=None, pool=AUTO, combine="max", min_keys=0, max_keys=None, local=None, scale=None,
                 logits_dtype=None, exact_band=AUTO) -> MaskRequest:
    """Check every option; ValueError naming expected and actual."""
    defaults_apply = method in ("topk", "tau", "threshold") and combine == "max" and slice_m in EXACT_BAND_SLICES
    if isinstance(exact_band, str) and exact_band == AUTO:
        exact_band = DEFAULT_EXACT_BAND if defaults_apply else None
    if isinstance(pool, str) and pool == AUTO:
        pool = min(DEFAULT_POOL, slice_m) if defaults_apply else None
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(slice_m, int) or slice_m < 1:
        raise ValueError(f"slice_m must be a positive int, got {slice_m!r}")
    if method == "colmax":
        rule = "threshold" if rule is None else rule
    elif rule is not None and rule != method:
        raise ValueError(f"rule={rule!r} only applies to method='colmax' (method {method!r} is its own rule)")
    else:
        rule = method
    if rule not in RULE_IDS:
        raise ValueError(f"rule must be one of {tuple(RULE_IDS)}, got {rule!r}")
    if rule == "topk":
        if (density is None) == (top_k is None):
            raise ValueError("top-k selection needs exactly one of density (fraction of keys) or top_k")
        if density is not None:
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"density must be in [0, 1], got {density}")
            top_k = round(density * kv_len)
        if not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
        top_k = int(min(top_k, kv_len))
    elif density is not None or top_k is not None:
        raise ValueError(f"density/top_k apply to top-k selection, not rule {rule!r}")
    if rule == "tau":
        tau = 0.9 if tau is None else float(tau)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
    elif tau is not None:
        raise ValueError(f"tau applies to rule 'tau', not {rule!r}")
    if rule == "threshold":
        if threshold is None:
            if method != "colmax":
                raise ValueError("rule 'threshold' needs threshold (a probability)")
            threshold = 0.5 / kv_len
        threshold = float(threshold)
        if not threshold > 0.0 or math.isinf(threshold):
            raise ValueError(f"threshold must be a positive probability, got {threshold}")
    elif threshold is not None:
        raise ValueError(f"threshold applies to rule 'threshold', not {rule!r}")
    pool = slice_m if pool is None else pool
    if method == "colmax":
        if pool != slice_m:
            raise ValueError("pool applies to mean-query methods, not colmax")
        if slice_m not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"colmax needs slice_m a power of two <= 128, got {slice_m}")
    elif not isinstance(pool, int) or pool < 1 or slice_m % pool or (pool < slice_m and (slice_m // pool) & (slice_m // pool - 1)):
        raise ValueError(f"pool must divide slice_m={slice_m} into a power-of-two number of sub-blocks, got {pool!r}")
    elif pool < slice_m and slice_m // pool > 128:
        raise ValueError(f"at most 128 sub-blocks per block, got slice_m / pool = {slice_m // pool}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if not isinstance(min_keys, int) or min_keys < 0:
        raise ValueError(f"min_keys must be a non-negative int, got {min_keys!r}")
    if local is not None and (not isinstance(local, int) or local < 0):
        raise ValueError(f"local must be None or a non-negative int (keys beyond the block on each side), got {local!r}")
    if max_keys is not None:
        band_width = slice_m + 2 * local if local is not None else 0
        if not isinstance(max_keys, int) or max_keys < max(1, min_keys, min(band_width, kv_len)):
            raise ValueError(f"max_keys must be an int >= max(1, min_keys={min_keys}, band width "
                             f"{min(band_width, kv_len)}), got {max_keys!r}")
    if exact_band is not None:
        if isinstance(exact_band, bool) or not isinstance(exact_band, (int, np.integer)) or exact_band < 0:
            raise ValueError(f"exact_band must be None or a non-negative int (keys beyond the block on each side), "
                             f"got {exact_band!r}")
        if method == "colmax" or combine != "max":
            raise ValueError(f"exact_band refines pooled max-prob scores: it needs a mean-query method and "
                             f"combine='max', got method={method!r}, combine={combine!r}")
        if slice_m not in EXACT_BAND_SLICES:
            raise ValueError(f"exact_band needs slice_m in {EXACT_BAND_SLICES} (one query block per CTA), got {slice_m}")
        if slice_m + 2 * int(exact_band) > _INT32_MAX:
            raise ValueError(f"exact_band={exact_band} is too wide for int32 key offsets")
        exact_band = int(exact_band)
    scale = ref.default_scale(head_dim) if scale is None else float(scale)
    stores_logits = method != "colmax" and exact_band is None and (pool == slice_m or combine == "union")
    if logits_dtype is None:
        logits_dtype = torch.float16 if stores_logits and rule in ("topk", "threshold") else torch.float32
    elif logits_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logits_dtype must be torch.float16 or torch.float32, got {logits_dtype!r}")
    elif logits_dtype == torch.float16 and not stores_logits:
        raise ValueError("logits_dtype=torch.float16 applies where logits are stored (mean-query scoring with one "
                         "pooled row per block, or combine='union'); colmax and combine='max' keep float32 "
                         "probabilities")
    return MaskRequest(method, rule, slice_m, pool, combine, top_k, tau, threshold, min_keys, max_keys, local, scale,
                       logits_dtype, exact_band)


def _predict_reference(qh, kh, req: MaskRequest, lse) -> SliceMask:
    return ref.predict_mask_reference(
        qh, kh, req.slice_m, req.method, rule=req.rule, top_k=req.top_k, tau=req.tau, threshold=req.threshold,
        pool=req.pool, combine=req.combine, min_keys=req.min_keys, max_keys=req.max_keys, local=req.local,
        lse=lse, scale=req.scale, logits_dtype=req.logits_dtype, exact_band=req.exact_band)


def static_row_counts(q_blocks: int, kv_len: int, req: MaskRequest, device="cpu") -> torch.Tensor:
    """int64 [QB]: kept keys of each block under top-k, known from the shapes alone:
    clamp(k, max(min_keys, band size), max_keys). On a CUDA device this launches, never syncs."""
    j = torch.arange(q_blocks, dtype=torch.int64, device=device)
    if req.local is None:
        band = torch.zeros_like(j)
    else:
        lo = (j * req.slice_m - req.local).clamp(0, kv_len)
        hi = torch.maximum(((j + 1) * req.slice_m + req.local).clamp(0, kv_len), lo)
        band = hi - lo
    lo_n = band.clamp(min=req.min_keys).clamp(max=kv_len)
    hi_n = lo_n.clamp(min=min(kv_len if req.max_keys is None else req.max_keys, kv_len))
    return torch.minimum(lo_n.clamp(min=req.top_k), hi_n)


@lru_cache(maxsize=32)
def _static_layout(batch: int, heads: int, q_blocks: int, kv_len: int, req: MaskRequest, device: str):
    """(int32 offsets of every block, int32 indptr [B, H, QB + 1], capacity) of a top-k mask:
    known from the shapes, so repeated predictions (every layer, every step) reuse them."""
    per_block = static_row_counts(q_blocks, kv_len, req)
    per_head = int(per_block.sum())
    capacity = per_head * batch * heads
    if capacity > _INT32_MAX:
        raise ValueError(f"the mask would keep {capacity} slices, more than int32 offsets address")
    starts = torch.cumsum(per_block, 0) - per_block
    head_base = torch.arange(batch * heads, dtype=torch.int64).unsqueeze(1) * per_head
    indptr = torch.cat([head_base + starts.unsqueeze(0), head_base + per_head], dim=1).to(torch.int32)
    offsets = indptr[:, :-1].reshape(-1)  # every block's start
    return offsets.to(device), indptr.reshape(batch, heads, q_blocks + 1).to(device), capacity


class _GpuPrediction:
    """Chunked over (batch x head): score, select, emit; then one SliceMask."""

    def __init__(self, qh, kh, req: MaskRequest, lse, workspace_bytes: int):
        self.qh, self.kh, self.req, self.lse = qh, kh, req, lse
        self.batch, self.heads, self.q_len, self.dim = qh.shape
        self.kv_len = kh.shape[2]
        self.bh = self.batch * self.heads
        self.q_blocks = num_blocks(self.q_len, req.slice_m)
        self.itemsize = 2 if req.logits_dtype == torch.float16 else 4
        self.ld = row_stride(self.kv_len, self.itemsize)
        self.device = qh.device
        kind = req.kind
        if kind == "colmax":
            self.rows = qh
        else:
            self.rows = ref.pool_queries(qh, req.pool).to(qh.dtype).contiguous()
        self.sub_rows = self.rows.shape[2]
        per_head = self.sub_rows if kind in ("mean", "union") else self.q_blocks
        self.chunk = max(1, min(self.bh, workspace_bytes // max(1, per_head * self.ld * self.itemsize)))
        # Sizes known from the shapes (top-k with one selection per block): fused emit, no sync.
        self.static = req.rule == "topk" and kind != "union"
        self.capped = req.max_keys is not None and kind != "union"

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
            # 8 warps (128 rows per CTA): K is read half as often as with 4.
            sub_lse = gpu_scores("stats", self.rows, self.kh, req.scale, bh0=bh0, nbh=nbh, warps=8)
            scores = gpu_scores("maxprob", self.rows, self.kh, req.scale, bh0=bh0, nbh=nbh, lse=sub_lse,
                                group=req.group, warps=8)
            if req.exact_band is not None:
                self._refine_band(scores, sub_lse, bh0, nbh)
            return scores, None
        lse = self.lse.reshape(self.bh, self.q_len)[bh0 : bh0 + nbh]
        return gpu_scores("maxprob", self.rows, self.kh, req.scale, bh0=bh0, nbh=nbh, lse=lse,
                          group=req.slice_m, warps=4 if req.slice_m <= 64 else 8), None

    def _refine_band(self, scores, sub_lse, bh0, nbh):
        """Exact column maxima on each block's band (mask_reference.refine_band), in place."""
        req = self.req
        band = (-req.exact_band, req.slice_m + 2 * req.exact_band)
        warps = req.slice_m // 16
        band_lse = gpu_scores("stats", self.qh, self.kh, req.scale, bh0=bh0, nbh=nbh, warps=warps, band=band)
        own = sub_lse.repeat_interleave(req.pool, dim=1)[:, : self.q_len]
        total = torch.logaddexp(band_lse, own)
        gpu_scores("maxprob", self.qh, self.kh, req.scale, bh0=bh0, nbh=nbh, lse=total, group=req.slice_m,
                   warps=warps, band=band, out=scores)

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
        sync, none with max_keys) and emit every chunk into it."""
        req, kind = self.req, self.req.kind
        if self.capped:
            total = min(req.max_keys, self.kv_len) * self.bh * self.q_blocks
            if total > _INT32_MAX:
                raise ValueError(f"max_keys={req.max_keys} x {self.bh * self.q_blocks} blocks exceeds int32 offsets")
            indices = torch.empty(total, dtype=torch.int32, device=self.device)
        if kind == "union":
            group, sub_rows, add_band = req.group, self.sub_rows, req.local
        else:
            group, sub_rows, add_band = 1, self.q_blocks, None
        chunks = []  # (first block row, counts, bitmask)
        for bh0, nbh, vals, lse in self._chunks():
            if kind == "union":
                _, bits = gpu_select(vals, self.kv_len, req, lse=lse, band=None, bits=True)
                counts = torch.empty(nbh * self.q_blocks, dtype=torch.int32, device=self.device)
                gpu_emit(bits, self.kv_len, sub_rows, group, req.slice_m, counts, add_band=add_band)
            else:
                counts, bits = gpu_select(vals, self.kv_len, req, lse=lse, band=req.local, bits=True)
            del vals, lse  # the emit reads only the bitmasks
            chunks.append((bh0 * self.q_blocks, counts, bits))
        all_counts = torch.cat([counts for _, counts, _ in chunks])
        starts = torch.cumsum(all_counts, 0, dtype=torch.int64) - all_counts
        # Everything that needs no buffer size is queued before the sync, so that after it only
        # the allocation and the emit launches remain (the GPU idles from the sync until then).
        offsets = starts.to(torch.int32)
        indptr = self._indptr(starts, all_counts)
        if not self.capped:
            total = all_counts.sum(dtype=torch.int64)
            used = int(total.item())  # the one host sync
            if used > _INT32_MAX:
                raise ValueError("the mask keeps more slices than int32 offsets address")
            indices = torch.empty(used, dtype=torch.int32, device=self.device)
        for row0, counts, bits in chunks:
            gpu_emit(bits, self.kv_len, sub_rows, group, req.slice_m, counts, add_band=add_band,
                     offsets=offsets[row0 : row0 + counts.numel()], out=indices)
        return SliceMask(indptr, indices, self.req.slice_m, self.q_len, self.kv_len)

    def _indptr(self, offsets, counts) -> torch.Tensor:
        """int32 indptr [B, H, QB + 1] from each block's start and the end of each head's last block."""
        starts = offsets.reshape(self.batch, self.heads, self.q_blocks)
        ends = (offsets + counts.to(torch.int64)).reshape(self.batch, self.heads, self.q_blocks)[..., -1:]
        return torch.cat([starts, ends], dim=-1).to(torch.int32).contiguous()

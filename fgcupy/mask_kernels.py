"""Launchers of the mask-prediction kernels (cuda_src/mask_score.cu, mask_select.cu).

Thin wrappers: they check what the kernels assume (16-byte aligned rows, padded score rows),
allocate outputs and launch on torch's current stream. fgcupy.scoring composes them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from . import bridge
from .jit import driver
from .jit.launch import launch
from .jit import runtime
from .jit.runtime import device_index
from .jit.score_spec import (E4M3, E4M3_HEAD_DIMS, E4M3_MODES, RULE_IDS, SCORE_KEY_TILE, SCORE_PARAMS,  # noqa: F401
                             SELECT_LARGE_SMEM, SELECT_MAX_SMEM, SM90_SCORE_GROUPS, SM90_SCORE_MODES, SM90_SCORE_ROWS,
                             DILATE_MAX_RADIUS, DILATE_RUN, ROWS_MAX_DIM,
                             ROWS_MAX_GROUPS, UNION_MAX_OFFSETS, UNION_MAX_WORDS, PACK_MAX_WORDS, AdaptiveRowsSpec, ColmaxSpec,
                             DilateInPlaceSpec, DilateSpec, EmitSpec, PackSpec, ScoreSpec, SelectSpec, Sm90ScoreSpec,
                             UnionSpec)
from .e4m3_kernels import gpu_heads_as_e4m3
from .mask import INT32_MAX, SliceMask, indptr_from_counts, is_int, num_blocks
from .mask_reference import COHERENCE_CUT, PROB_DTYPE, dilate_keys, stored_probs

_TARGET_CTAS = 2048


def _cp_async_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its rows can be read with 16-byte copies, else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        s % 8 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    return t if ok else t.contiguous()


def row_stride(kv_len: int, itemsize: int = 4) -> int:
    """Score rows are padded to 128 bytes (32 float32 or 64 16-bit scores): every row starts on a
    cache line, so the scoring kernel's 32-byte row segments fill whole sectors (float16 rows
    padded to 16 bytes only straddled sectors and were slower than float32 ones)."""
    per = 128 // itemsize
    return (kv_len + per - 1) // per * per


def _key_chunking(kv_len: int, row_tiles: int, key_tile: int = SCORE_KEY_TILE) -> tuple:
    """(keys per CTA, number of key chunks): enough CTAs to fill the GPU when rows are few; no
    chunk where there are no keys (nothing to launch)."""
    tiles = num_blocks(kv_len, key_tile)
    if tiles == 0:
        return key_tile, 0
    chunks = min(tiles, max(1, num_blocks(_TARGET_CTAS, max(row_tiles, 1))))
    per = num_blocks(tiles, chunks) * key_tile
    return per, num_blocks(kv_len, per)


SCORE_KERNELS = ("auto", "mma", "wgmma")


def _score_spec(kernel: str, portable, group: int, band, device):
    """The scoring kernel of a launch: the wgmma kernel (128 rows per CTA) on Hopper for the
    modes it has, where a band's or a list's row tile (``portable``'s rows per CTA) is its 128
    rows and groups hold two or more rows; else ``portable``, an mma.sync kernel (ScoreSpec or
    ColmaxSpec). ``kernel`` "mma" or "wgmma" forces one."""
    if kernel not in SCORE_KERNELS:
        raise ValueError(f"kernel must be one of {SCORE_KERNELS}, got {kernel!r}")
    mode = portable.mode
    whole_tiles = band is not None or mode == "listmax"  # a row tile is one query block
    fits = (mode in SM90_SCORE_MODES and (not whole_tiles or portable.rows_per_cta == SM90_SCORE_ROWS)
            and (mode != "maxprob" or group >= 2))
    if kernel == "wgmma" and not fits:
        raise ValueError(f"the wgmma scoring kernel has no mode {mode!r} with group={group}, band={band}, "
                         f"{portable.rows_per_cta} rows per CTA")
    if kernel == "mma" or not fits:
        return portable
    if kernel == "auto" and not runtime.is_hopper(device_index(device)):
        return portable
    group = SM90_SCORE_ROWS if mode == "listmax" else group if mode == "maxprob" else 1
    return Sm90ScoreSpec(portable.dtype, portable.head_dim, mode, group)


def _check_scale(scale: float) -> None:
    """The scoring kernels take maxima of raw products and fold the scale into the exponent."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number (the kernels fold it into maxima), got {scale}")


def _score_params(rows, k, scale: float, *, out, ld: int, partial, lse, bh0: int, key_chunk: int, group: int,
                  out_rows: int, band: tuple, lists: tuple = (None, None), head_scale=None, skip: tuple = (None, 0),
                  partial_sq=None):
    """The ScoreParams of one scoring launch over rows [B, H, R, D] and k [B, H, S, D] (and, in
    list mode, the (indptr, indices) of the key lists each block scores; for e4m3 rows and keys,
    viewed as 16-bit columns, each head's factor of the logit scale; in stats mode, the
    (ranges, block) of keys each block of rows skips and ``partial_sq``, where not None, for the
    chunks' LSE of twice the logits)."""
    return SCORE_PARAMS.pack(
        rows=rows, r_sb=rows.stride(0), r_sh=rows.stride(1), r_ss=rows.stride(2),
        k=k, k_sb=k.stride(0), k_sh=k.stride(1), k_ss=k.stride(2),
        out=out, out_ld=ld, partial=partial, partial_sq=partial_sq, lse=lse,
        heads=rows.shape[1], bh0=bh0, n_rows=rows.shape[2], kv_len=k.shape[2], key_chunk=key_chunk,
        group=group, out_rows=out_rows, band_lo=band[0], band_width=band[1],
        scale=scale, scale_log2=scale * math.log2(math.e),
        list_indptr=lists[0], list_indices=lists[1], head_scale=head_scale, skip_ranges=skip[0], skip_block=skip[1],
    )


def gpu_refine_band(q: torch.Tensor, k: torch.Tensor, scale: float, sub_lse: torch.Tensor, pool: int, slice_m: int,
                    band: tuple, out: torch.Tensor, *, bh0: int = 0, nbh: int | None = None,
                    kernel: str = "auto") -> torch.Tensor:
    """Raise pooled max-probability scores ``out`` (bfloat16 [nbh, QB, ld]) of heads
    [bh0, bh0 + nbh) on each query block's band ``(lo, width)`` to the exact column maxima (mask_reference.refine_band:
    each query's LSE is its band LSE log-added to ``sub_lse`` [nbh, ceil(q_len / pool)] of the
    sub-block holding it). On Hopper with blocks of 128 one launch (the wgmma kernel's band mode);
    otherwise a stats pass over the bands, the log-add in torch, and a max-probability pass.
    Returns ``out``."""
    batch, heads, q_len, dim = q.shape
    nbh = batch * heads - bh0 if nbh is None else nbh
    _check_scale(scale)
    warps = slice_m // 16
    specs = band_specs(bridge.dtype_name(q.dtype, "q"), dim, slice_m, q.device, kernel)
    if len(specs) > 1:  # the portable passes
        band_lse = gpu_scores("stats", q, k, scale, bh0=bh0, nbh=nbh, warps=warps, band=band, kernel=kernel)
        own = sub_lse.repeat_interleave(pool, dim=1)[:, :q_len]
        return gpu_scores("maxprob", q, k, scale, bh0=bh0, nbh=nbh, lse=torch.logaddexp(band_lse, own), group=slice_m,
                          warps=warps, band=band, out=out, kernel=kernel)
    q_blocks, kv_len = num_blocks(q_len, slice_m), k.shape[2]
    ld = row_stride(kv_len, PROB_DTYPE.itemsize)
    _check_prob_out(out, (nbh, q_blocks, ld))
    if sub_lse.shape != (nbh, num_blocks(q_len, pool)) or sub_lse.dtype != torch.float32:
        raise ValueError(f"sub_lse must be float32 {(nbh, num_blocks(q_len, pool))}, got {tuple(sub_lse.shape)} "
                         f"{sub_lse.dtype}")
    width = int(band[1])
    if width < 1:
        raise ValueError(f"band width must be positive, got {band}")
    spec = specs[0]  # the fused band kernel
    q, k = _cp_async_ready(q), _cp_async_ready(k)
    # One key chunk: each CTA needs its rows' whole band for their LSE.
    params = _score_params(q, k, scale, out=out, ld=ld, partial=None, lse=sub_lse.contiguous(), bh0=bh0,
                           key_chunk=min(kv_len, width), group=pool, out_rows=q_blocks, band=(int(band[0]), width))
    if nbh and q_len:
        launch(spec, q.device, spec.grid(1, num_blocks(q_len, SM90_SCORE_ROWS), nbh), params)
    return out


def scores_spec(mode: str, dtype: str, dim: int, *, group: int = 1, warps: int = 4, band: tuple | None = None,
                device: torch.device, kernel: str = "auto"):
    """The kernel ``gpu_scores`` launches for these arguments (checking them)."""
    portable = ScoreSpec(dtype, dim, mode, warps)
    if mode == "maxprob" and (group < 1 or group & (group - 1) or portable.rows_per_cta % group):
        raise ValueError(f"group={group} must be a power of two dividing {portable.rows_per_cta}")
    if mode == "maxprob" and group == portable.rows_per_cta:  # whole blocks: the column-max kernel
        portable = ColmaxSpec(portable.dtype, dim, mode, warps)
    return _score_spec(kernel, portable, group, band, device)


def e4m3_runs(device: torch.device, head_dim: int) -> bool:
    """Whether the e4m3 max-probability pass runs for these inputs: a Hopper GPU, a head dim it has."""
    return device.type == "cuda" and head_dim in E4M3_HEAD_DIMS and runtime.is_hopper(device_index(device))


def e4m3_spec(mode: str, dim: int, group: int, band, device: torch.device, kernel: str = "auto") -> Sm90ScoreSpec:
    """The kernel of an e4m3 scoring launch; ValueError naming what exists where there is none."""
    if mode not in E4M3_MODES or band is not None or kernel == "mma" or group not in SM90_SCORE_GROUPS:
        raise ValueError(f"e4m3 rows and keys take modes {E4M3_MODES} with groups {SM90_SCORE_GROUPS}, no band, "
                         f"on the wgmma kernel; got mode={mode!r}, group={group}, band={band}, kernel={kernel!r}")
    if not e4m3_runs(device, dim):
        raise ValueError(f"e4m3 scoring runs on Hopper (sm_90) GPUs with head dims {E4M3_HEAD_DIMS}; got head dim "
                         f"{dim} on {device}")
    return Sm90ScoreSpec(E4M3, dim, mode, group)


def _checked_head_scale(head_scale, rows, k) -> torch.Tensor:
    heads = rows.shape[0] * rows.shape[1]
    if k.dtype != rows.dtype:
        raise ValueError(f"e4m3 rows need e4m3 keys, got {k.dtype}")
    if (not isinstance(head_scale, torch.Tensor) or head_scale.dtype != torch.float32
            or tuple(head_scale.shape) != (heads,) or head_scale.device != rows.device):
        raise ValueError(f"e4m3 scoring needs head_scale: float32 [{heads}] on {rows.device}, one factor of the "
                         f"logit scale per head, got {head_scale!r}")
    return head_scale.contiguous()


def band_specs(dtype: str, dim: int, slice_m: int, device: torch.device, kernel: str = "auto") -> list:
    """The kernels ``gpu_refine_band`` launches: the fused band kernel, or a stats and a
    max-probability pass."""
    warps = slice_m // 16
    portable = ScoreSpec(dtype, dim, "stats", warps)
    fused = _score_spec(kernel, portable, 1, (0, 1), device)
    if fused is not portable:
        return [Sm90ScoreSpec(dtype, dim, "band", SM90_SCORE_ROWS)]
    return [portable, scores_spec("maxprob", dtype, dim, group=slice_m, warps=warps, band=(0, 1), device=device,
                                  kernel=kernel)]


def gpu_scores(mode: str, rows: torch.Tensor, k: torch.Tensor, scale: float, *, bh0: int = 0, nbh: int | None = None,
               lse: torch.Tensor | None = None, group: int = 1, warps: int = 4, band: tuple | None = None,
               out: torch.Tensor | None = None, kernel: str = "auto", head_scale: torch.Tensor | None = None,
               skip: tuple | None = None, squares: bool = False):
    """Run fg::mask_score (or fg::mask_score_sm90, see _score_spec) on heads [bh0, bh0 + nbh) of
    rows [B, H, R, D] against k [B, H, S, D].

    mode "logits" -> (float32 logits [nbh, R, ld], lse [nbh, R]); "logits_f16" -> the same with
    the logits stored as float16 (lse from the float32 logits); "stats" -> lse [nbh, R];
    "maxprob" (lse [nbh, R] given) -> bfloat16 scores [nbh, ceil(R / group), ld] (PROB_DTYPE).
    ld = row_stride(S) of the stored dtype.
    float8_e4m3fn rows and k (e4m3_spec: "maxprob" on Hopper) need ``head_scale``: float32 [B * H],
    each head's factor of the logit scale (1 / the two powers of two of fgcupy.e4m3.to_e4m3).

    ``band=(lo, width)``: each tile of warps x 16 rows (one query block of single queries)
    takes only the keys [row0 + lo, row0 + lo + width): "stats" gives each row's LSE over its
    band; "maxprob" (group = warps x 16) raises ``out``'s scores of those keys to the exact
    maxima and returns ``out``.

    ``skip=(ranges, block)`` ("stats" only, no band): the rows of query block j (``block`` rows
    each, a multiple of 16) leave the keys [ranges[j, 0], ranges[j, 1]) out of their LSE;
    ``ranges``: int32 [ceil(R / block), 2] on the rows' device.

    ``squares`` ("stats" only) -> (lse, lse_twice), both [nbh, R]: lse_twice is each row's LSE
    of twice its logits over the same keys, from the same pass: sum_j p_j^2 = exp(lse_twice - 2 lse).
    """
    batch, heads, n_rows, dim = rows.shape
    kv_len = k.shape[2]
    nbh = batch * heads - bh0 if nbh is None else nbh
    _check_scale(scale)
    if squares and mode != "stats":
        raise ValueError(f"squares applies to mode 'stats', got mode {mode!r}")
    e4m3 = rows.dtype == torch.float8_e4m3fn
    if e4m3:
        spec = e4m3_spec(mode, dim, group, band, rows.device, kernel)
        head_scale = _checked_head_scale(head_scale, rows, k)
        rows, k = rows.view(torch.int16), k.view(torch.int16)  # the kernel reads e4m3 pairs as 16-bit columns
    else:
        spec = scores_spec(mode, bridge.dtype_name(rows.dtype, "rows"), dim, group=group, warps=warps, band=band,
                           device=rows.device, kernel=kernel)
        if head_scale is not None:
            raise ValueError("head_scale applies to float8_e4m3fn rows and keys")
    skip = (None, 0) if skip is None else _checked_skip(skip, mode, band, n_rows, rows.device)
    rows, k = _cp_async_ready(rows), _cp_async_ready(k)
    half = mode == "logits_f16"
    ld = row_stride(kv_len, 2 if half else PROB_DTYPE.itemsize if mode == "maxprob" else 4)
    row_tiles = num_blocks(n_rows, spec.rows_per_cta) * nbh
    band_lo, band_width = (0, 0) if band is None else (int(band[0]), int(band[1]))
    if band is not None:
        if mode not in ("stats", "maxprob") or band_width < 1:
            raise ValueError(f"band applies to modes 'stats' and 'maxprob' with a positive width, got {mode!r}, {band}")
        if mode == "maxprob" and (group != spec.rows_per_cta or out is None):
            raise ValueError(f"band maxprob needs group == {spec.rows_per_cta} rows per CTA and out= scores")
        key_chunk, chunks = _key_chunking(min(kv_len, band_width), row_tiles, spec.key_tile)
    else:
        key_chunk, chunks = _key_chunking(kv_len, row_tiles, spec.key_tile)
    device = rows.device
    partial = partial_sq = None
    out_rows = num_blocks(n_rows, group)
    if mode in ("logits", "logits_f16"):
        out = torch.empty(nbh, n_rows, ld, dtype=torch.float16 if half else torch.float32, device=device)
    if mode == "maxprob":
        if out is None:
            out = torch.empty(nbh, out_rows, ld, dtype=PROB_DTYPE, device=device)
        else:
            _check_prob_out(out, (nbh, out_rows, ld))
        lse = lse.reshape(nbh, n_rows).contiguous()
    else:
        partial = torch.empty(nbh, n_rows, chunks, dtype=torch.float32, device=device)
        if squares:
            partial_sq = torch.empty_like(partial)
    params = _score_params(rows, k, scale, out=out, ld=ld, partial=partial, lse=lse if mode == "maxprob" else None,
                           bh0=bh0, key_chunk=key_chunk, group=group, out_rows=out_rows, band=(band_lo, band_width),
                           head_scale=head_scale, skip=skip, partial_sq=partial_sq)
    if nbh and n_rows and chunks:
        launch(spec, device, spec.grid(chunks, num_blocks(n_rows, spec.rows_per_cta), nbh), params)
    if mode == "maxprob":
        return out
    if squares:
        return _rows_lse(partial), _rows_lse(partial_sq)
    return _rows_lse(partial) if mode == "stats" else (out, _rows_lse(partial))


def _rows_lse(partial: torch.Tensor) -> torch.Tensor:
    """Each row's LSE from its key chunks' [..., chunks]. One chunk (bands, short rows): its LSE
    is the row's; logsumexp over a dimension of one would still run two reductions over every row."""
    return partial[..., 0] if partial.shape[-1] == 1 else torch.logsumexp(partial, dim=-1)


def _checked_skip(skip, mode: str, band, n_rows: int, device: torch.device) -> tuple:
    ranges, block = skip
    if mode != "stats" or band is not None:
        raise ValueError(f"skip applies to mode 'stats' without a band, got mode={mode!r}, band={band}")
    if not is_int(block) or block < 16 or block % 16:
        raise ValueError(f"skip's block must be a positive multiple of 16 rows (a warp's rows share it), got {block!r}")
    blocks = num_blocks(n_rows, block)
    if (not isinstance(ranges, torch.Tensor) or ranges.dtype != torch.int32 or ranges.device != device
            or tuple(ranges.shape) != (blocks, 2)):
        raise ValueError(f"skip's ranges must be int32 [{blocks}, 2] on {device}, got {ranges!r}")
    ranges = ranges.contiguous()
    return ranges if ranges.data_ptr() % 8 == 0 else ranges.clone(), int(block)  # the kernel reads int2 pairs


def gpu_colmax(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor, slice_m: int, *, bh0: int = 0,
               nbh: int | None = None) -> torch.Tensor:
    """A dense step's exact column maxima (``gpu_scores`` max-probability pass over every query,
    groups of ``slice_m``) of heads [bh0, bh0 + nbh): bfloat16 [nbh, ceil(q_len / slice_m), ld];
    ``lse`` [nbh, q_len]."""
    return gpu_scores("maxprob", q, k, scale, bh0=bh0, nbh=nbh, lse=lse, group=slice_m, warps=colmax_warps(slice_m))


def gpu_colmax_e4m3(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor, slice_m: int, *,
                    bh0: int = 0, nbh: int | None = None) -> torch.Tensor:
    """``gpu_colmax`` from q and k rounded to e4m3 (fgcupy.e4m3; Hopper, e4m3_runs): the heads'
    e4m3 copies (fgcupy.e4m3_kernels), then one e4m3 max-probability pass."""
    nbh = q.shape[0] * q.shape[1] - bh0 if nbh is None else nbh
    e4m3_spec("maxprob", q.shape[-1], slice_m, None, q.device)  # refused before any conversion
    q8, k8, head_scale = gpu_heads_as_e4m3(q, k, bh0, nbh)
    return gpu_scores("maxprob", q8, k8, scale, lse=lse, group=slice_m, head_scale=head_scale)


def colmax_warps(slice_m: int) -> int:
    """Warps of ``gpu_colmax``'s scoring CTAs for query blocks of ``slice_m``."""
    return 4 if slice_m <= 64 else 8


def gpu_candidate_colmax(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor, candidates,
                         out: torch.Tensor, *, bh0: int = 0, nbh: int | None = None,
                         kernel: str = "auto") -> torch.Tensor:
    """The exact column maxima of heads [bh0, bh0 + nbh) on the keys each query block of the
    SliceMask ``candidates`` lists (its own slice_m), written into bfloat16 ``out``
    [nbh, QB, ld] (other keys keep what ``out`` holds); ``lse`` [nbh, q_len]. One CTA per query
    block walks its list (the list mode of mask_score_sm90.cu on Hopper with blocks of 128, else
    of mask_colmax.cu; ``kernel`` as in ``gpu_scores``). Returns ``out``."""
    batch, heads, q_len, dim = q.shape
    nbh = batch * heads - bh0 if nbh is None else nbh
    _check_scale(scale)
    slice_m = candidates.slice_m
    q_blocks, kv_len = num_blocks(q_len, slice_m), k.shape[2]
    if (candidates.batch, candidates.heads, candidates.q_len, candidates.kv_len) != (batch, heads, q_len, kv_len):
        raise ValueError(f"candidates cover (B, H, q_len, kv_len)="
                         f"{(candidates.batch, candidates.heads, candidates.q_len, candidates.kv_len)}, the scores "
                         f"{(batch, heads, q_len, kv_len)}")
    if candidates.indptr.device != q.device:
        raise ValueError(f"candidates are on {candidates.indptr.device}, the queries on {q.device}")
    portable = ColmaxSpec(bridge.dtype_name(q.dtype, "q"), dim, "listmax", slice_m // 16)
    spec = _score_spec(kernel, portable, slice_m, None, q.device)
    _check_prob_out(out, (nbh, q_blocks, row_stride(kv_len, PROB_DTYPE.itemsize)))
    q, k = _cp_async_ready(q), _cp_async_ready(k)
    # Lists hold at most kv_len keys: chunks past a block's list end at once (entries past kv_len
    # of a longer list, which only repeated keys make, are not scored). The offsets are clamped
    # into the list as the attention kernels clamp theirs: a corrupt mask reads no further.
    key_chunk, chunks = _key_chunking(kv_len, q_blocks * nbh, spec.key_tile)
    params = _score_params(q, k, scale, out=out, ld=out.shape[-1], partial=None,
                           lse=lse.reshape(nbh, q_len).contiguous(), bh0=bh0, key_chunk=key_chunk, group=slice_m,
                           out_rows=q_blocks, band=(0, 0),
                           lists=(candidates.indptr.clamp(0, candidates.capacity).contiguous(),
                                  candidates.indices.contiguous()))
    if nbh and q_len and chunks:
        launch(spec, q.device, spec.grid(chunks, q_blocks, nbh), params)
    return out


@lru_cache(maxsize=None)
def _smem_optin(device_index: int) -> int:
    """The shared memory a block may opt in to: through the driver (no CUDA Python package
    imported), through cupy where libcuda does not load."""
    if driver.available():
        return driver.device_attribute(device_index, driver.DEVICE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    import cupy

    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_index)


#: The selection kernel's name of each score-row dtype.
SCORE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def select_spec(device: torch.device, ld: int, scores: str, rule: str) -> SelectSpec:
    """The staged kernel where the row fits the shared memory this GPU grants (the larger cap
    where it grants that, 1 KB left for static shared memory), else the global one; top-k's
    own, or the one taking any rule."""
    optin = _smem_optin(device_index(device))
    cap = SELECT_LARGE_SMEM if optin >= SELECT_LARGE_SMEM + 1024 else SELECT_MAX_SMEM
    staged = SelectSpec.fits(ld, cap) and optin >= cap + 1024
    return SelectSpec(staged=staged, scores=scores, max_smem=cap if staged else SELECT_MAX_SMEM,
                      rule="topk" if rule == "topk" else "any")


def bit_words(kv_len: int) -> int:
    """32-bit words per row of a selection bitmask."""
    return (kv_len + 31) // 32


def gpu_select(vals: torch.Tensor, kv_len: int, req, *, lse=None, band: int | None = None,
               offsets=None, out=None, counts=None, bits: bool = False):
    """Run fg::select_rows on score rows vals [n, R, ld] (R rows per head; float32, float16
    logits or bfloat16 max-probability scores).

    ``req``: a fgcupy.scoring.MaskRequest (rule and its options). Returns (counts int32 [n * R],
    bitmask int32 [n * R, bit_words(kv_len)] of the kept keys if ``bits`` else None); with
    ``offsets``/``out`` also writes the kept indices (fused emit). ``lse`` [n, R] marks vals as
    logits.
    """
    n, per_head, ld = vals.shape
    rows = n * per_head
    device = vals.device
    scores = SCORE_DTYPES.get(vals.dtype)
    if scores is None or (scores == "float16" and lse is None) or (scores == "bfloat16" and lse is not None):
        raise TypeError(f"score rows must be float32, float16 logits (with lse) or bfloat16 probabilities (no lse); "
                        f"got {vals.dtype} {'with' if lse is not None else 'without'} lse")
    if ld < kv_len or ld % (16 // vals.element_size()) or not vals.is_contiguous() or vals.data_ptr() % 16:
        raise ValueError(f"score rows must be contiguous, 16-byte aligned [n, R, ld >= kv_len] with rows of a "
                         f"multiple of 16 bytes; got shape {tuple(vals.shape)}, {vals.dtype}")
    spec = select_spec(device, ld, scores, req.rule)
    counts = torch.empty(rows, dtype=torch.int32, device=device) if counts is None else counts
    words = bit_words(kv_len)
    mask_bits = torch.empty(rows, words, dtype=torch.int32, device=device) if bits else None
    if req.rule == "threshold":
        thr = math.log(req.threshold) if lse is not None else req.threshold
    else:
        thr = 0.0
    params = spec.params.pack(
        vals=vals, ld=ld, lse=None if lse is None else lse.reshape(rows).contiguous(), counts=counts,
        offsets=offsets, out=out, bits=mask_bits, kv_len=kv_len, rows_per_bh=per_head, slice_m=req.slice_m,
        band=-1 if band is None else band, rule=RULE_IDS[req.rule], k_keys=req.top_k or 0, tau=req.tau or 0.0,
        thr=thr, min_keys=req.min_keys, max_keys=kv_len if req.max_keys is None else req.max_keys, words=words,
    )
    if rows:
        launch(spec, device, (rows,), params, shared_mem=spec.launch_smem(ld))
    return counts, mask_bits


def gpu_emit(bits: torch.Tensor, kv_len: int, sub_rows: int, group: int, slice_m: int, counts, *,
             add_band=None, offsets=None, out=None):
    """Run fg::emit_rows on selection bitmasks bits [n * sub_rows, words]: count (no offsets)
    into ``counts`` or write the kept keys of each block (union over ``group`` sub-rows, plus
    the band ``add_band``)."""
    words = bits.shape[1]
    n = bits.shape[0] // max(sub_rows, 1)
    out_rows = num_blocks(sub_rows, group)
    spec = EmitSpec()
    params = spec.params.pack(bits=bits, counts=counts, offsets=offsets, out=out, words=words, kv_len=kv_len,
                              sub_rows=sub_rows, out_rows=out_rows, group=group, slice_m=slice_m,
                              add_band=-1 if add_band is None else add_band)
    if n * out_rows:
        launch(spec, bits.device, (n * out_rows,), params)


def gpu_dilate(scores: torch.Tensor, radius: int, kv_len: int, *, mul: torch.Tensor | None = None) -> torch.Tensor:
    """fg::dilate_rows on bfloat16 score rows [..., ld]: the first ``kv_len`` keys of each row
    raised to the max over keys j - radius .. j + radius (mask_reference.dilate_keys), in a new
    tensor; with ``mul`` (same shape) sqrt(mul * that) in float32, stored (stored_probs),
    written into ``mul``. Radii beyond DILATE_MAX_RADIUS (sub-blocks of more than 128 queries) run the torch
    reference."""
    if radius > DILATE_MAX_RADIUS:
        dilated = dilate_keys(scores.float(), radius, kv_len)
        if mul is None:
            return dilated.to(scores.dtype)
        return mul.copy_(stored_probs(torch.sqrt(mul.float() * dilated)))
    for name, t in (("scores", scores), ("mul", mul)):
        if t is not None:
            _check_rows(name, t, scores)
    ld = scores.shape[-1]
    _check_dilation(radius, kv_len, ld)
    out = torch.empty_like(scores) if mul is None else mul
    rows = scores.numel() // ld if ld else 0
    if rows:
        spec = DilateSpec()
        launch(spec, scores.device, spec.grid(rows, ld),
               spec.params.pack(src=scores, mul=mul, dst=out, ld=ld, kv_len=kv_len, radius=radius))
    return out


def _check_rows(name: str, t: torch.Tensor, like: torch.Tensor):
    if (t.dtype != PROB_DTYPE or not t.is_contiguous() or t.data_ptr() % 16 or t.shape[-1] % DILATE_RUN
            or t.shape != like.shape):
        raise ValueError(f"{name} rows must be contiguous, 16-byte aligned {PROB_DTYPE} of one shape with ld a "
                         f"multiple of {DILATE_RUN}; got shape {tuple(t.shape)}, {t.dtype}")


def _check_prob_out(out: torch.Tensor, shape: tuple):
    if out.shape != shape or out.dtype != PROB_DTYPE or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {PROB_DTYPE} {shape}, got {tuple(out.shape)} {out.dtype}")


def _check_dilation(radius: int, kv_len: int, ld: int):
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if not 0 <= kv_len <= ld:
        raise ValueError(f"kv_len must be in [0, ld={ld}], got {kv_len}")


def gpu_dilate_in_place(scores: torch.Tensor, radius: int, kv_len: int, flags: torch.Tensor) -> torch.Tensor:
    """fg::dilate_rows_in_place: the rows of bfloat16 ``scores`` [..., ld] whose entry of ``flags``
    (bool, one per row) is set get ``gpu_dilate``'s sliding max over their first ``kv_len`` keys,
    in place; the other rows are left as they are. Returns ``scores``."""
    _check_rows("scores", scores, scores)
    ld = scores.shape[-1]
    rows = scores.numel() // ld if ld else 0
    if flags.dtype != torch.bool or flags.numel() != rows or flags.device != scores.device:
        raise ValueError(f"flags must be bool with one entry per row ({rows}) on {scores.device}, got "
                         f"{flags.numel()} {flags.dtype} on {flags.device}")
    _check_dilation(radius, kv_len, ld)
    if radius > DILATE_MAX_RADIUS:
        view = scores.view(rows, ld)[:, :kv_len]
        view.copy_(torch.where(flags.view(rows, 1), dilate_keys(view.float(), radius).to(view.dtype), view))
        return scores
    if rows and kv_len:
        spec = DilateInPlaceSpec()
        launch(spec, scores.device, (rows,), spec.params.pack(scores=scores, flags=flags.contiguous(), ld=ld,
                                                                kv_len=kv_len, radius=radius))
    return scores


def gpu_adaptive_rows(q: torch.Tensor, pool: int, slice_m: int):
    """fg::adaptive_rows: mask_reference.adaptive_rows (rows [B, H, ceil(S / pool), D] in q's
    dtype, sampled bool [B, H, QB]) in one read of the queries, or None where the kernel does not
    apply (not a 16-bit CUDA tensor, a head dim not a multiple of 64 or above ROWS_MAX_DIM, pool
    not a multiple of 4 or more than ROWS_MAX_GROUPS sub-blocks a block, a block not a multiple
    of 32 queries (the kernel's warps take four queries at a time, within one sub-block), odd
    strides or a misaligned start)."""
    batch, heads, q_len, dim = q.shape
    if (q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16) or dim % 64 or dim > ROWS_MAX_DIM
            or pool % 4 or slice_m % 32 or slice_m % pool or slice_m // pool > ROWS_MAX_GROUPS or q.stride(3) != 1
            or any(st % 2 for st in q.stride()[:3]) or q.data_ptr() % 4 or q_len == 0):
        return None
    q_blocks = num_blocks(q_len, slice_m)
    rows = torch.empty(batch, heads, num_blocks(q_len, pool), dim, dtype=q.dtype, device=q.device)
    sampled = torch.empty(batch, heads, q_blocks, dtype=torch.bool, device=q.device)
    spec = AdaptiveRowsSpec()
    launch(spec, q.device, (batch * heads * q_blocks,),
           spec.params.pack(q=q, rows=rows, sampled=sampled, stride_b=q.stride(0), stride_h=q.stride(1),
                            stride_s=q.stride(2), heads=heads, q_len=q_len, dim=dim, slice_m=slice_m, pool=pool,
                            is_bf16=int(q.dtype == torch.bfloat16), cut=COHERENCE_CUT))
    return rows, sampled


def gpu_pack(mask) -> tuple | None:
    """fg::pack_rows: (int32 [rows, ceil(kv_len / 32)] each row's keys as a bit map, key j in bit
    j % 32 of word j / 32, keys outside [0, kv_len) and repeats left out; int32 [rows] the keys
    each row keeps), no host sync; None where the kernel does not apply (rows longer than
    PACK_MAX_WORDS * 32 keys)."""
    words = -(-mask.kv_len // 32)
    if words > PACK_MAX_WORDS:
        return None
    rows = mask.batch * mask.heads * mask.q_blocks
    bits = torch.empty(rows, words, dtype=torch.int32, device=mask.device)
    counts = torch.zeros(rows, dtype=torch.int32, device=mask.device)
    if rows and words:
        spec = PackSpec()
        launch(spec, mask.device, (rows,),
               spec.params.pack(indptr=mask.indptr.contiguous(), indices=mask.indices.contiguous(), bits=bits,
                                counts=counts, capacity=mask.capacity, q_blocks=mask.q_blocks, kv_len=mask.kv_len,
                                words=words),
               shared_mem=4 * words)
    return bits, counts


def gpu_union(mask, offsets: tuple, extra=None):
    """fg::union_rows: mask_algebra.union_reference on the GPU (a count launch, one host sync
    for the size, a write launch), or None where the kernel does not apply (rows longer than
    UNION_MAX_WORDS * 32 keys)."""
    words = -(-mask.kv_len // 32)
    if words > UNION_MAX_WORDS:
        return None
    rows = mask.batch * mask.heads * mask.q_blocks
    counts = torch.zeros(rows, dtype=torch.int32, device=mask.device)
    spec = UnionSpec()
    moved = {f"offset{i}": int(offsets[i]) if i < len(offsets) else 0 for i in range(UNION_MAX_OFFSETS)}
    lists = {"indptr": mask.indptr.contiguous(), "indices": mask.indices.contiguous(), "capacity": mask.capacity,
             "extra_indptr": None if extra is None else extra.indptr.contiguous(),
             "extra_indices": None if extra is None else extra.indices.contiguous(),
             "extra_capacity": 0 if extra is None else extra.capacity}

    def run(offsets_of_rows=None, out=None):
        if rows and words:
            launch(spec, mask.device, (rows,),
                   spec.params.pack(counts=counts, offsets=offsets_of_rows, out=out, q_blocks=mask.q_blocks,
                                    kv_len=mask.kv_len, words=words, n_offsets=len(offsets), **lists, **moved),
                   shared_mem=8 * words)

    run()
    indptr = indptr_from_counts(counts, mask.batch, mask.heads, mask.q_blocks)
    total = int(counts.sum(dtype=torch.int64).item())  # the one host sync
    if total > INT32_MAX:
        raise ValueError(f"the union keeps {total} slices, more than int32 offsets address")
    indices = torch.empty(total, dtype=torch.int32, device=mask.device)
    run(indptr[..., :-1].reshape(-1).contiguous(), indices)
    return SliceMask(indptr, indices, mask.slice_m, mask.q_len, mask.kv_len)

"""Each query's softmax LSE estimated without a dense step, for the exact column max.

The column-max score of a key is the highest probability that any query of the block gives
it, and a probability needs its query's LSE (the log of its softmax normaliser). A dense step
yields the LSE; without one, ``estimate_lse`` log-adds two parts:

* the exact log-mass of the keys around the query's block (its band: the block's own keys and
  ``band`` more on either side), where local and sharp heads put most of each query's mass;
* the log-mass that the block's mean query gives every key, from every few keys
  (``mask_reference.sampled_lse``): the broad part a band cannot see.

Either part alone fails on some heads (the band alone on region mixtures, the mean alone on
sharp Gaussians: notes/MEASURED.md "Mask quality"). The band's keys count in both parts and the mean
query's mass is no bound on any one query's, so the estimate is judged by the masks it gives.
On a GPU the band part runs on the scoring stats kernel (mask_kernels.gpu_scores, a band of
keys per query block); elsewhere, and under torch.compile (where it traces), plain torch in head
chunks bounded by ``workspace_bytes``.
"""

from __future__ import annotations

import math

import torch

from . import mask_reference as ref
from .layout import query_key_views
from .attention_kernel import check_scale
from .mask import is_int, num_blocks
from .mask_request import check_workspace_bytes

#: Keys either side of a block whose exact mass the estimate counts (the default exact band).
ESTIMATE_BAND = 64
#: Bytes the band logits of one head chunk (and their exponentials) may take.
DEFAULT_BAND_WORKSPACE = 1 << 30


def estimate_lse(q, k, slice_m: int = 128, *, band: int = ESTIMATE_BAND, scale: float | None = None,
                 layout: str = "HND", workspace_bytes: int = DEFAULT_BAND_WORKSPACE) -> torch.Tensor:
    """float32 [B, H, q_len] natural-log LSE estimate of each query of ``q`` over the keys ``k``
    ([B, H, S, D] "HND" or [B, S, H, D] "NHD", torch or cupy), on q's device: what
    ``predict_mask(method="colmax", lse=...)`` needs where no dense step ran
    (``lse="estimate"`` there calls this). ``slice_m``: the query blocks whose mean query and
    band are used; ``scale`` defaults to 1 / sqrt(D). Queries with a NaN or infinite entry are
    left out of their block's mean (a block with none keeps only the band's part); NaN logits
    add no mass."""
    qh, kh = query_key_views(q, k, layout)
    for name, value, low in (("slice_m", slice_m, 1), ("band", band, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
    scale = ref.default_scale(qh.shape[3]) if scale is None else scale
    check_scale(scale)
    check_workspace_bytes(workspace_bytes)
    slice_m = int(slice_m)
    batch, heads, q_len, dim = qh.shape
    kv_len = kh.shape[2]
    blocks = num_blocks(q_len, slice_m)
    band = min(int(band), max(kv_len, blocks * slice_m))  # wider bands hold the same keys
    out = torch.empty(batch, heads, q_len, dtype=torch.float32, device=qh.device)
    near_all = _kernel_band_lse(qh, kh, slice_m, band, scale)
    per_head = _bytes_per_head(blocks, slice_m, band, kv_len, dim, band_in_torch=near_all is None)
    chunk = max(1, min(heads, int(workspace_bytes // per_head)))
    # An index, not repeat_interleave and a slice: torch 2.13's inductor fused those into logaddexp
    # wrongly on the CPU (the last block's queries read garbage).
    block_of_query = torch.arange(q_len, device=qh.device) // slice_m
    for b in range(batch):
        for h0 in range(0, heads, chunk):  # views of q and k (an NHD layout is not copied whole)
            qc, kc = qh[b, h0 : h0 + chunk], kh[b, h0 : h0 + chunk]
            if near_all is None:
                near, broad = lse_parts(qc, kc, slice_m, band, scale, block_of_query)
            else:
                near, broad = near_all[b, h0 : h0 + chunk], block_mean_lse(qc, kc, slice_m, scale, block_of_query)
            out[b, h0 : h0 + chunk] = torch.logaddexp(near, broad)
    return out


def _kernel_band_lse(qh, kh, slice_m: int, band: int, scale: float):
    """``band_lse`` of every head by the stats kernel (one CTA per query block, its band of keys;
    mask_kernels.gpu_scores), float32 [B, H, q_len]; None where it does not apply (CPU tensors, a
    trace under torch.compile, shapes or dtypes the kernel lacks), and the torch path runs."""
    if qh.device.type != "cuda" or torch.compiler.is_compiling() or qh.dtype not in (torch.bfloat16, torch.float16):
        return None
    from .jit.launch import GRID_LIMITS
    from .jit.runtime import kernels_can_run
    from .jit.spec import HEAD_DIMS, SLICE_SIZES

    if slice_m not in SLICE_SIZES or qh.shape[3] not in HEAD_DIMS or not kernels_can_run():
        return None
    from .mask_kernels import gpu_scores

    batch, heads, q_len, _ = qh.shape
    lse = torch.cat([gpu_scores("stats", qh, kh, scale, bh0=bh0, nbh=min(GRID_LIMITS[2], batch * heads - bh0),
                                warps=slice_m // 16, band=(-band, slice_m + 2 * band))
                     for bh0 in range(0, batch * heads, GRID_LIMITS[2])])
    # A NaN query has no band mass, as in torch; infinities stay.
    return lse.view(batch, heads, q_len).nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def lse_parts(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float,
              block_of_query: torch.Tensor | None = None) -> tuple:
    """(band part, block-mean part), each float32 [N, q_len], of ``estimate_lse`` for q [N, q_len,
    D] and k [N, kv_len, D] (unchecked): the estimate is their logaddexp. ``block_of_query``:
    each query's block index (made here when not given)."""
    if block_of_query is None:
        block_of_query = torch.arange(q.shape[1], device=q.device) // slice_m
    return band_lse(q, k, slice_m, band, scale), block_mean_lse(q, k, slice_m, scale, block_of_query)


def block_mean_lse(q: torch.Tensor, k: torch.Tensor, slice_m: int, scale: float,
                   block_of_query: torch.Tensor) -> torch.Tensor:
    """float32 [N, q_len]: the estimate's block-mean part for q [N, q_len, D], k [N, kv_len, D]:
    each query gets its block's finite-query mean's LSE over every few keys (-inf for a block
    with no finite query)."""
    means, counted = finite_block_means(q, slice_m)
    broad = torch.where(counted, ref.sampled_lse(means.unsqueeze(0), k.unsqueeze(0), scale)[0], -math.inf)
    return broad.index_select(1, block_of_query)


def _bytes_per_head(blocks: int, slice_m: int, band: int, kv_len: int, dim: int, band_in_torch: bool = True) -> int:
    """Float32 bytes one head's estimate holds at its peak: the padded queries and the block
    means' logits over the sampled keys with their two temporaries, and where the band runs in
    torch its logits and their exponentials, the band windows matmul makes contiguous and the
    padded keys."""
    width = slice_m + 2 * band
    sampled = num_blocks(kv_len, ref.lse_key_stride(kv_len))
    band_bytes = 2 * blocks * slice_m * width + blocks * dim * width + 2 * (kv_len + width) * dim
    return 4 * ((band_bytes if band_in_torch else 0) + blocks * slice_m * dim + 3 * blocks * sampled)


def finite_block_means(q: torch.Tensor, slice_m: int) -> tuple:
    """(float32 [..., QB, D] mean of each block's queries whose entries are all finite, bool
    [..., QB] whether a block has any) for q [..., q_len, D]."""
    *lead, q_len, dim = q.shape
    blocks, whole = num_blocks(q_len, slice_m), q_len // slice_m
    used = torch.isfinite(q).all(-1)
    kept = torch.where(used.unsqueeze(-1), q, 0)  # in q's dtype: no float32 copy of the queries
    sums = torch.empty(*lead, blocks, dim, dtype=torch.float32, device=q.device)
    counts = torch.empty(*lead, blocks, dtype=torch.int64, device=q.device)
    sums[..., :whole, :] = kept[..., : whole * slice_m, :].unflatten(-2, (whole, slice_m)).sum(-2, dtype=torch.float32)
    counts[..., :whole] = used[..., : whole * slice_m].unflatten(-1, (whole, slice_m)).sum(-1)
    if whole < blocks:  # the last block, cut short
        sums[..., whole, :] = kept[..., whole * slice_m :, :].sum(-2, dtype=torch.float32)
        counts[..., whole] = used[..., whole * slice_m :].sum(-1)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


def band_lse(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float) -> torch.Tensor:
    """float32 [N, q_len]: each query's exact LSE over its block's band (keys [j*M - band,
    (j+1)*M + band) of block j, clipped to the keys; -inf where that holds none) for q [N, q_len,
    D] and k [N, kv_len, D]; NaN logits add no mass."""
    n, q_len, dim = q.shape
    kv_len = k.shape[1]
    blocks = num_blocks(q_len, slice_m)
    width = slice_m + 2 * band
    right = max(0, blocks * slice_m + band - kv_len)
    padded = torch.nn.functional.pad(k.float(), (0, 0, band, right))
    windows = padded.unfold(1, width, slice_m)[:, :blocks]  # [N, QB, D, width]: block j's band keys
    queries = torch.nn.functional.pad(q.float(), (0, 0, 0, blocks * slice_m - q_len)).view(n, blocks, slice_m, dim)
    logits = torch.matmul(queries, windows) * scale  # [N, QB, M, width]
    keys = torch.arange(blocks, device=q.device).unsqueeze(1) * slice_m - band + torch.arange(width, device=q.device)
    outside = (keys < 0) | (keys >= kv_len)
    logits.masked_fill_(outside.view(1, blocks, 1, width), -math.inf)
    logits.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.logsumexp(logits, -1).view(n, blocks * slice_m)[:, :q_len]

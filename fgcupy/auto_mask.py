"""``predict_mask(method="auto")``: the cheap top-k mask, checked per head, and the estimated
column max on the heads where the check finds it missing attention the best mask keeps.

The cheap default (pooled mean and sampled queries with the exact band) is near the oracle
where a block's queries look alike and several times off it where they do not (region
mixtures, sharp Gaussian heads); the column max with each query's LSE estimated is near the
oracle everywhere but costs about two thirds of a dense step. The check tells the two kinds of head
apart on a few query blocks per head, spread over the sequence: on their queries it measures
the attention mass the cheap mask misses and the mass their own best mask of the same size
(exact column-max top-k) misses, from each query's exact LSE. A head whose cheap mask misses
more than ``MISS_RATIO`` times the best mask's (plus ``MISS_FLOOR``) is predicted again by the
estimated column max. The check's kernels score ``CHECK_BLOCKS`` blocks per head against every
key, twice (LSE, column max), and run two sparse calls over them, about 1/30 of a dense step's
work at 32,760 tokens, but it waits on the host (notes/MEASURED.md "Per head" has what it took);
the heads it flags cost what the column max costs.
"""

from __future__ import annotations

import torch

from . import mask_reference as ref
from .attention import sparse_attention
from .lse_estimate import stats_kernel_runs
from .mask import SliceMask, num_blocks
from .mask_algebra import concat_heads, take_blocks

#: Query blocks per head the check scores against every key (evenly spread; fewer if the
#: sequence has fewer).
CHECK_BLOCKS = 8
#: A head is predicted again where its cheap mask misses more than MISS_RATIO times the mass
#: the best mask of the same size misses on the checked blocks, plus MISS_FLOOR (so two masks
#: that both keep all but a trace do not count as different).
MISS_RATIO = 1.2
MISS_FLOOR = 1e-4
#: Bytes the torch path's float32 logits of the checked rows may take at once.
_CHECK_WORKSPACE = 1 << 30


def predict_auto(qh, kh, slice_m: int, predict, *, density, top_k, scale: float,
                 workspace_bytes: int) -> SliceMask:
    """The "auto" mask for q, k [B, H, S, D] views (checked by ``predict``, which is
    fgcupy.predict_mask): cheap top-k on every head, the estimated column max on flagged heads.
    Syncs the host (which heads; the masks' gathers)."""
    rule = dict(density=density, top_k=top_k, scale=scale, workspace_bytes=workspace_bytes)
    cheap = predict(qh, kh, slice_m, "topk", **rule)
    flagged = flagged_heads(qh, kh, cheap, predict, scale, rule)
    if not flagged:
        return cheap
    index = torch.tensor(flagged, dtype=torch.int64, device=qh.device)
    exact = predict(qh.index_select(1, index), kh.index_select(1, index), slice_m, "colmax", lse="estimate",
                    rule="topk", **rule)
    heads = qh.shape[1]
    position = {h: heads + i for i, h in enumerate(flagged)}  # the flagged heads follow cheap's in the join
    return concat_heads([cheap, exact], order=[position.get(h, h) for h in range(heads)])


def flagged_heads(qh, kh, cheap: SliceMask, predict, scale: float, rule: dict) -> list:
    """Heads (ascending) where ``cheap`` misses more than MISS_RATIO times the mass the best
    mask of its size misses on the checked blocks, in any batch entry."""
    missed, best_missed = missed_mass(qh, kh, cheap, predict, scale, rule)
    worse = (missed > MISS_RATIO * best_missed + MISS_FLOOR).any(0)
    return [int(h) for h in torch.nonzero(worse).flatten().tolist()]


def check_blocks(q_blocks: int, count: int = CHECK_BLOCKS) -> list:
    """``count`` query blocks spread evenly over ``q_blocks`` (all of them if fewer), ascending."""
    if q_blocks <= count:
        return list(range(q_blocks))
    return sorted({round(i * (q_blocks - 1) / (count - 1)) for i in range(count)})


def missed_mass(qh, kh, cheap: SliceMask, predict, scale: float, rule: dict) -> tuple:
    """(float32 [B, H] mean share of the attention mass ``cheap`` misses on the checked blocks'
    queries, the same for the best mask of the same size: exact column-max top-k of those
    blocks). NaN logits add no mass to the exact LSE; queries whose exact LSE is not finite, or
    whose LSE over a mask's keys is NaN (a NaN key kept), are left out."""
    slice_m, q_len = cheap.slice_m, qh.shape[2]
    blocks = check_blocks(num_blocks(q_len, slice_m))
    rows = torch.cat([torch.arange(b * slice_m, min(q_len, (b + 1) * slice_m), device=qh.device) for b in blocks])
    q_rows = qh.index_select(2, rows)
    exact = exact_row_lse(q_rows, kh, scale)
    best = predict(q_rows, kh, slice_m, "colmax", lse=exact, rule="topk", **rule)
    sub_len = rows.numel()
    kept = [sparse_attention(q_rows, kh, kh, mask, scale=scale, return_lse=True)[1]  # values unused
            for mask in (take_blocks(cheap, blocks, sub_len), best)]
    valid = torch.isfinite(exact) & ~kept[0].isnan() & ~kept[1].isnan()
    count = valid.sum(-1).clamp_min(1)
    return tuple(torch.where(valid, -torch.expm1(lse - exact), 0.0).sum(-1) / count for lse in kept)


def exact_row_lse(q_rows, kh, scale: float) -> torch.Tensor:
    """float32 [B, H, R]: each row's natural-log LSE over every key of kh, NaN logits adding no
    mass (the stats kernel where it runs, else float32 products in head chunks)."""
    batch, heads, n_rows, dim = q_rows.shape
    on_kernel = _kernel_row_lse(q_rows, kh, scale)
    if on_kernel is not None:
        return on_kernel
    out = torch.empty(batch, heads, n_rows, dtype=torch.float32, device=q_rows.device)
    chunk = max(1, min(heads, _CHECK_WORKSPACE // max(1, 8 * n_rows * kh.shape[2])))
    for b in range(batch):
        for h0 in range(0, heads, chunk):
            logits = ref.float32_products(q_rows[b, h0 : h0 + chunk], kh[b, h0 : h0 + chunk]).mul_(scale)
            out[b, h0 : h0 + chunk] = ref.nan_free_logsumexp(logits)
    return out


def _kernel_row_lse(q_rows, kh, scale: float):
    """The stats kernel's row LSE, or None where it does not apply (lse_estimate.stats_kernel_runs)."""
    if not stats_kernel_runs(q_rows):
        return None
    from .jit.launch import GRID_LIMITS
    from .mask_kernels import gpu_scores

    batch, heads, n_rows, _ = q_rows.shape
    total = batch * heads
    parts = [gpu_scores("stats", q_rows, kh, scale, bh0=bh0, nbh=min(GRID_LIMITS[2], total - bh0), warps=8)
             for bh0 in range(0, total, GRID_LIMITS[2])]
    return torch.cat(parts).view(batch, heads, n_rows)

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
key, twice (LSE, column max), and run one sparse call over them for both masks, about 1/30 of a
dense step's work at 32,760 tokens; the host waits once, for the list of flagged heads
(notes/MEASURED.md "Per head" has what it took). The heads it flags cost what the column max
costs.
"""

from __future__ import annotations

import torch

from . import mask_reference as ref
from .attention import sparse_attention
from .device_constants import device_constant
from .lse_estimate import stats_kernel_runs
from .mask import SliceMask, even_indptr, num_blocks

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
    One host sync (which heads): both masks keep the same count per block, so the flagged heads'
    rows replace the cheap ones in place (where every head is flagged, the column max's mask is
    the answer; a run of heads is predicted from views of q and k, other sets from copies)."""
    rule = dict(density=density, top_k=top_k, scale=scale, workspace_bytes=workspace_bytes)
    cheap = predict(qh, kh, slice_m, "topk", **rule)
    flagged = flagged_heads(qh, kh, cheap, predict, scale, rule)
    if not flagged:
        return cheap
    run = slice(flagged[0], flagged[-1] + 1)
    index = None
    if flagged == list(range(run.start, run.stop)):  # a run of heads: views of q and k, no copies
        picked = qh[:, run], kh[:, run]
    else:
        index = torch.tensor(flagged, dtype=torch.int64).to(qh.device, non_blocking=True)
        picked = qh.index_select(1, index), kh.index_select(1, index)
    exact = predict(*picked, slice_m, "colmax", lse="estimate", rule="topk", **rule)
    if len(flagged) == qh.shape[1]:
        return exact
    keys = block_keys(cheap).clone()
    if index is None:
        keys[:, run] = block_keys(exact)
    else:
        keys.index_copy_(1, index, block_keys(exact))
    return SliceMask(cheap.indptr, keys.reshape(-1), slice_m, cheap.q_len, cheap.kv_len)


def block_keys(mask: SliceMask) -> torch.Tensor:
    """int32 [B, H, QB, k]: the keys of a top-k mask (every block keeps k, back to back, as
    predict_mask lays them out, no spare capacity), viewed without a copy or a host sync. Other
    layouts raise ValueError (on a CUDA mask, a device-side assertion: checked without a sync)."""
    rows = mask.batch * mask.heads * mask.q_blocks
    per_row = mask.capacity // rows if rows else 0
    message = (f"a top-k mask keeps the same count in each of its {rows} blocks, back to back, and stores "
               f"nothing more; this one's {mask.capacity} stored keys are laid out otherwise")
    if per_row * rows != mask.capacity:
        raise ValueError(message)
    even = (mask.indptr == _even_indptr(mask.batch, mask.heads, mask.q_blocks, per_row, mask.device)).all()
    if mask.device.type == "cuda":
        torch._assert_async(even, message)
    elif not even:
        raise ValueError(message)
    return mask.indices.view(mask.batch, mask.heads, mask.q_blocks, per_row)


def flagged_heads(qh, kh, cheap: SliceMask, predict, scale: float, rule: dict) -> list:
    """Heads (ascending) where ``cheap`` (a top-k mask, as block_keys takes) misses more than
    MISS_RATIO times the mass the best mask of its size misses on the checked blocks, in any
    batch entry (one host sync)."""
    missed, best_missed = missed_mass(qh, kh, cheap, predict, scale, rule)
    worse = (missed > MISS_RATIO * best_missed + MISS_FLOOR).any(0)
    return [int(h) for h in torch.nonzero(worse).flatten().tolist()]


def check_blocks(q_blocks: int, count: int = CHECK_BLOCKS) -> list:
    """``count`` query blocks spread evenly over ``q_blocks`` (all of them if fewer), ascending."""
    if q_blocks <= count:
        return list(range(q_blocks))
    return sorted({round(i * (q_blocks - 1) / (count - 1)) for i in range(count)})


def _checked_rows(q_len: int, slice_m: int, device: torch.device) -> tuple:
    """(int64 [n] the checked blocks, int64 [2 * n * slice_m] their query rows twice, each block
    filled to slice_m rows by repeating its last row, bool [n * slice_m]: which rows are not
    repeats), on ``device``, made once per shape (fgcupy.device_constants)."""
    def build(on):
        blocks = torch.tensor(check_blocks(num_blocks(q_len, slice_m)), dtype=torch.int64, device=on)
        rows = (blocks[:, None] * slice_m + torch.arange(slice_m, device=on)).reshape(-1)
        return blocks, rows.clamp_max(q_len - 1).repeat(2), rows < q_len

    return device_constant(("checked rows", q_len, slice_m), device, build)


def _even_indptr(batch: int, heads: int, q_blocks: int, per_row: int, device: torch.device) -> torch.Tensor:
    """mask.even_indptr, made once per shape (fgcupy.device_constants) for the check's own use
    (compared against, or the indptr of a mask it makes and drops): never handed to a caller,
    who could write into it."""
    return device_constant(("even indptr", batch, heads, q_blocks, per_row), device,
                           lambda on: even_indptr(batch, heads, q_blocks, per_row, on))


def missed_mass(qh, kh, cheap: SliceMask, predict, scale: float, rule: dict) -> tuple:
    """(float32 [B, H] mean share of the attention mass ``cheap`` (a top-k mask, as block_keys
    takes) misses on the checked blocks' queries, the same for the best mask of the same size:
    exact column-max top-k of those blocks). Both masks' LSE come from one sparse call over the
    checked rows twice.
    NaN logits add no mass to the exact LSE; queries whose exact LSE is not finite, or whose LSE
    over a mask's keys is NaN (a NaN key kept), are left out. No host sync."""
    slice_m, q_len = cheap.slice_m, qh.shape[2]
    keys = block_keys(cheap)
    blocks, rows_twice, real = _checked_rows(q_len, slice_m, qh.device)
    # The checked rows twice (the sparse call's queries: cheap's blocks, then best's), the first
    # copy the rows themselves; whole blocks: a repeated last row leaves a block's column max as it is.
    q_twice = qh.index_select(2, rows_twice)
    q_rows = q_twice[:, :, : real.numel()]
    exact = exact_row_lse(q_rows, kh, scale)
    best = predict(q_rows, kh, slice_m, "colmax", lse=exact, rule="topk", **rule)
    both = torch.cat([keys.index_select(2, blocks), block_keys(best)], dim=2)  # [B, H, 2n, k]
    batch, heads, n_blocks, per_row = both.shape
    pair = SliceMask(_even_indptr(batch, heads, n_blocks, per_row, qh.device), both.reshape(-1), slice_m,
                     n_blocks * slice_m, kh.shape[2])
    lse = sparse_attention(q_twice, kh, kh, pair, scale=scale, return_lse=True)[1].view(batch, heads, 2, -1)
    valid = real & torch.isfinite(exact) & ~lse.isnan().any(2)
    shares = torch.where(valid.unsqueeze(2), -torch.expm1(lse - exact.unsqueeze(2)), 0.0).sum(-1)
    shares /= valid.sum(-1, keepdim=True).clamp_min(1)
    return shares[:, :, 0], shares[:, :, 1]


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
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(batch, heads, n_rows)

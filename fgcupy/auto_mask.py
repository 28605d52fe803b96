"""``predict_mask(method="auto")``: the cheap top-k mask, checked per head, and the estimated
column max on the heads where the check finds it erring well past the best mask.

The cheap top-k (pooled mean and sampled queries with the exact band) is near the oracle where a
block's queries look alike and several times off it where they do not (region mixtures, sharp
Gaussian heads); the column max with each query's LSE estimated is near the oracle everywhere
but costs about 0.4x a dense step on Hopper. The check tells the two kinds of head apart on a
few query blocks per head, spread over the sequence, and on the head's blocks whose farthest
query lies farthest from their mean in the keys' metric (where a pooled row's logits stand for a
query's worst): on their queries it measures the attention mass the cheap mask misses and the
mass their own best mask of the same size (exact column-max top-k) misses, and estimates the
output error each gives, from each query's exact LSE of its logits and of twice them
(``estimated_error``: the missed keys' squared probabilities and the renormalisation, over
values independent of the scores). A head whose cheap mask misses more than ``MISS_RATIO`` times
the best mask's mass (plus ``MISS_FLOOR``), or whose estimated error exceeds ``ERROR_RATIO``
times the best mask's (past ``ERROR_FLOOR``), is predicted again by the estimated column max.
The two readings fail apart: the missed mass passes a mask that misses a few heavy keys where
the best misses many light ones (a window beside a global low-rank component, 1.3-7x off), and
the error estimate cannot resolve errors below the LSE's rounding (about 1e-3 of the output's
spread at the head families' logit scale, more where the LSE is larger), where the missed mass
still can. The check's kernels score ``CHECK_BLOCKS + SPREAD_BLOCKS`` blocks per head against
every key twice (LSE of the logits and of twice them in one pass, then column max), and run one
sparse call over them and their doubles for both masks; the host waits once, for the list of
flagged heads (notes/MEASURED.md "Per head" has what it took). The heads it flags cost what the
column max costs.

The estimate can fail too: where each query's mass sits on a few keys that its sample misses
(very sharp heads with no locality), its LSE is wrong query by query. The same blocks check the
estimated column max's mask (one more sparse call over them, a second host wait, on flagged
heads only), and a head whose estimate errs as the cheap mask did is scored again with each
query's exact LSE (a stats pass over every key, on those heads alone; not yet timed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import mask_reference as ref
from .attention import sparse_attention
from .device_constants import device_constant
from .lse_estimate import stats_kernel_runs
from .mask import SliceMask, even_indptr, num_blocks
from .mask_request import e4m3_runs_for

#: Query blocks per head the check scores against every key (evenly spread; fewer if the
#: sequence has fewer).
CHECK_BLOCKS = 8
#: More blocks per head it scores: those with the query farthest from its block's mean, where
#: a pooled row stands for a query worst. A head hard only in a few regions, or only where a
#: block takes a few queries of the next frame (periodic, so it can fall between the evenly
#: spread blocks), is checked there too.
SPREAD_BLOCKS = 4
#: A head is predicted again where, on the checked blocks, its cheap mask misses more than
#: MISS_RATIO times the mass the best mask of the same size misses, plus MISS_FLOOR (so two
#: masks that both keep all but a trace do not count as different) ...
MISS_RATIO = 1.2
MISS_FLOOR = 1e-4
#: ... or its estimated output error exceeds ERROR_RATIO times the best mask's, the two squared
#: errors apart by more than ERROR_FLOOR squared. Errors are relative to the output's spread;
#: the LSE's float32 rounding alone reads about 1e-3 there (every family, both masks keeping
#: every key, H100; it grows with the LSE of twice the logits, so heads of larger logits read
#: more, and near ties there may be flagged, at the column max's cost), so below the floor the
#: missed mass, exact to about 1e-6, decides.
ERROR_RATIO = 1.4
ERROR_FLOOR = 1e-3
#: Each key dimension's own variance added to the keys' covariance, in that share, so that its
#: factor exists where keys vary along fewer directions than they have dimensions.
_KEY_METRIC_JITTER = 0.05
#: Bytes the torch path's float32 logits of the exact LSE may take at once.
_CHECK_WORKSPACE = 1 << 30


def predict_auto(qh, kh, slice_m: int, predict, *, density, top_k, scale: float,
                 workspace_bytes: int) -> SliceMask:
    """The "auto" mask for q, k [B, H, S, D] views (checked by ``predict``, which is
    fgcupy.predict_mask): cheap top-k on every head, the estimated column max on flagged heads,
    and the column max with the exact LSE where the estimate fails the same check. One host sync
    (which heads), two where any head is flagged. Every mask keeps the same count per block, so
    the new rows replace the old ones in place."""
    rule = dict(density=density, top_k=top_k, scale=scale, workspace_bytes=workspace_bytes)
    cheap = predict(qh, kh, slice_m, "topk", **rule)
    check = check_heads(qh, kh, cheap, predict, scale, rule)
    flagged = flagged_heads(check)
    if not flagged:
        return cheap

    def estimated(q, k, pick):
        mask = predict(q, k, slice_m, "colmax", lse="estimate", rule="topk", **rule)
        weak = flagged_heads(check.of_heads(pick).against(mask, k, scale))
        if not weak:
            return mask
        # The estimated path's products, e4m3 where that kernel runs: same rounding as the mask it replaces.
        products = "e4m3" if e4m3_runs_for(q) else "input"
        return with_heads_replaced(mask, q, k, weak, lambda qw, kw, _: predict(
            qw, kw, slice_m, "colmax", lse=exact_row_lse(qw, kw, scale, workspace_bytes), rule="topk",
            products=products, **rule))

    return with_heads_replaced(cheap, qh, kh, flagged, estimated)


def with_heads_replaced(base: SliceMask, qh, kh, heads: list, predict_heads) -> SliceMask:
    """``base`` (a top-k mask, as block_keys takes) with the rows of ``heads`` (ascending, not
    empty) those of ``predict_heads(q, k, pick)``: a top-k mask of the same count per block for
    those heads of q and k, ``pick`` taking them from any [B, H, ...] tensor (views where the
    heads are a run, else copies). Where they are every head, that mask is the answer."""
    run = slice(heads[0], heads[-1] + 1)
    index = None
    if heads == list(range(run.start, run.stop)):
        def pick(t):
            return t[:, run]
    else:
        index = torch.tensor(heads, dtype=torch.int64).to(qh.device, non_blocking=True)

        def pick(t):
            return t.index_select(1, index)
    new = predict_heads(pick(qh), pick(kh), pick)
    if len(heads) == qh.shape[1]:
        return new
    keys = block_keys(base).clone()
    if index is None:
        keys[:, run] = block_keys(new)
    else:
        keys.index_copy_(1, index, block_keys(new))
    return SliceMask(base.indptr, keys.reshape(-1), base.slice_m, base.q_len, base.kv_len)


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


def check_blocks(q_blocks: int, count: int = CHECK_BLOCKS) -> list:
    """``count`` query blocks spread evenly over ``q_blocks`` (all of them if fewer), ascending."""
    if q_blocks <= count:
        return list(range(q_blocks))
    return sorted({round(i * (q_blocks - 1) / (count - 1)) for i in range(count)})


def key_metric_factor(kh: torch.Tensor) -> torch.Tensor:
    """float32 [B, H, D, D]: a factor L of each head's centered key covariance C (L Lᵀ ≈ C,
    scaled to unit mean variance), so that ||(q − p) L||² is the variance over keys of the
    difference between query q's logits and those of a row p: what a pooled row p loses of q.
    A direction along which keys do not vary (a key projection's bias) counts for nothing, a
    direction of large keys counts most. For a factor to exist where keys vary along fewer than
    D directions (and where bfloat16 products round C), each dimension's own variance is added
    at ``_KEY_METRIC_JITTER`` times; where the factor still fails, each dimension's standard
    deviation alone. Dimensions where some key is not finite count for nothing."""
    batch, heads, kv_len, dim = kh.shape
    # bfloat16 for float16 keys: a float16 sum of S squared entries overflows from S * var = 65,504.
    centered = torch.empty(kh.shape, dtype=torch.bfloat16 if kh.dtype == torch.float16 else kh.dtype,
                           device=kh.device)
    torch.sub(kh, kh.mean(2, dtype=torch.float32, keepdim=True).to(kh.dtype), out=centered)
    cov = torch.matmul(centered.transpose(-1, -2), centered).float().div_(max(1, kv_len))
    cov = torch.nan_to_num_(cov, nan=0.0, posinf=0.0, neginf=0.0)
    variance = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    std = variance.sqrt()
    inv = torch.where(std > 0, 1 / std, 0.0)
    scaled = cov * inv.unsqueeze(-1) * inv.unsqueeze(-2)  # unit diagonal where a dimension varies
    eye = torch.eye(dim, dtype=torch.float32, device=kh.device)
    factor, info = torch.linalg.cholesky_ex(scaled + _KEY_METRIC_JITTER * eye)
    factor = torch.where((info == 0)[..., None, None], factor, eye)
    mean_variance = variance.mean(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return factor * (std / mean_variance.sqrt().unsqueeze(-1)).unsqueeze(-1)


def block_outlier(qh: torch.Tensor, slice_m: int, metric: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, H, QB]: each query block's largest squared distance of a query from the
    block's mean (the query its pooled rows stand for worst: a few queries of the next frame or
    run, which the cheap scores lose, as well as blocks whose queries all spread), from the
    queries less their mean in q's dtype, norms in float32 (no float copy of q); with ``metric``
    ([B, H, D, D] in q's dtype, e.g. ``key_metric_factor``), of the queries times it, centred in
    place (one copy of q either way). NaN where a block holds a non-finite query (topk ranks
    such blocks first). No host sync."""
    q_len = qh.shape[2]
    full = q_len // slice_m
    parts = [(qh[:, :, : full * slice_m], (full, slice_m))]
    if q_len % slice_m:  # the last block, short
        parts.append((qh[:, :, full * slice_m :], (1, q_len % slice_m)))
    outliers = []
    for queries, blocks in parts:
        if metric is not None:
            queries = torch.matmul(queries, metric)
        rows = queries.unflatten(2, blocks)  # [B, H, QB, slice_m, D]
        means = rows.sum(3, dtype=torch.float32).div_(rows.shape[3]).to(rows.dtype).unsqueeze(3)
        centred = rows.sub_(means) if metric is not None else rows - means
        distances = torch.linalg.vector_norm(centred, dim=-1, dtype=torch.float32)
        outliers.append(distances.amax(-1).square_())
    return outliers[0] if len(outliers) == 1 else torch.cat(outliers, 2)


def checked_blocks(qh: torch.Tensor, kh: torch.Tensor, slice_m: int) -> tuple:
    """(int64 [B, H, n] the query blocks the check scores per head, how many of them come first
    spread evenly): the CHECK_BLOCKS spread evenly, then the SPREAD_BLOCKS others of largest
    ``block_outlier`` in the keys' metric (``key_metric_factor``: how far a block's pooled row
    stands from its farthest query in logits, not in raw query space, where a spread along a
    direction no key varies along would draw the check away from the blocks that matter);
    every block, all counted as spread evenly, where there are no more. No host sync."""
    batch, heads, q_len, _ = qh.shape
    q_blocks = num_blocks(q_len, slice_m)
    if q_blocks <= CHECK_BLOCKS + SPREAD_BLOCKS:
        return torch.arange(q_blocks, device=qh.device).expand(batch, heads, -1), q_blocks
    even = device_constant(("checked blocks", q_blocks), qh.device,
                           lambda on: torch.tensor(check_blocks(q_blocks), dtype=torch.int64, device=on))
    outlier = block_outlier(qh, slice_m, key_metric_factor(kh).to(qh.dtype)).index_fill_(2, even, -torch.inf)
    widest = outlier.topk(SPREAD_BLOCKS, dim=2).indices
    return torch.cat([even.expand(batch, heads, -1), widest], dim=2), even.numel()


def _rows_of(blocks: torch.Tensor, slice_m: int, q_len: int) -> tuple:
    """(int64 [B, H, n * slice_m] the query rows of ``blocks`` [B, H, n], each block filled to
    slice_m rows by repeating its last row, bool [B, H, n * slice_m]: which rows are not repeats)."""
    rows = (blocks[..., None] * slice_m + torch.arange(slice_m, device=blocks.device)).flatten(2)
    return rows.clamp_max(q_len - 1), rows < q_len


def _blocks_of(keys: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[B, H, n, k]: the rows ``blocks`` [B, H, n] of ``keys`` [B, H, QB, k]."""
    return keys.gather(2, blocks[..., None].expand(-1, -1, -1, keys.shape[3]))


def _even_indptr(batch: int, heads: int, q_blocks: int, per_row: int, device: torch.device) -> torch.Tensor:
    """mask.even_indptr, made once per shape (fgcupy.device_constants) for the check's own use
    (compared against, or the indptr of a mask it makes and drops): never handed to a caller,
    who could write into it."""
    return device_constant(("even indptr", batch, heads, q_blocks, per_row), device,
                           lambda on: even_indptr(batch, heads, q_blocks, per_row, on))


@dataclass(frozen=True)
class HeadCheck:
    """What the check measured on its query blocks, per head, for a top-k mask and for the best
    mask of its size (exact column-max top-k of those blocks), from each query's exact LSE: the
    mean share of the attention mass each misses, and the output error each gives
    (``estimated_error``); each apart on the evenly spread blocks and on the widest ones (so a
    few hard blocks are not averaged away by many easy ones)."""

    blocks: torch.Tensor       # int64 [B, H, n]: the checked query blocks of each head
    q_rows: torch.Tensor       # [B, H, n * slice_m, D]: their queries, each block filled to slice_m rows
    row_lse: torch.Tensor      # float32 [B, H, 2, n * slice_m]: each row's exact LSE, of its logits and of twice them
    valid: torch.Tensor        # bool [B, H, n * slice_m]: rows the means count
    missed: torch.Tensor       # float32 [B, H, 2]: the checked mask's mean missed share (even, widest blocks)
    best_missed: torch.Tensor  # float32 [B, H, 2]: the best mask's
    error: torch.Tensor        # float32 [B, H, 2]: the checked mask's estimated output error, over the output's spread
    best_error: torch.Tensor   # float32 [B, H, 2]: the best mask's
    even_rows: int             # the rows of the evenly spread blocks, first in q_rows

    def of_heads(self, pick) -> HeadCheck:
        """This check of the heads ``pick`` takes from a [B, H, ...] tensor."""
        return HeadCheck(*(pick(t) for t in (self.blocks, self.q_rows, self.row_lse, self.valid, self.missed,
                                             self.best_missed, self.error, self.best_error)), self.even_rows)

    def against(self, mask: SliceMask, kh, scale: float) -> HeadCheck:
        """This check with ``mask`` (a top-k mask of the same heads, as block_keys takes; kh their
        keys) as the checked mask: one sparse call over the checked rows and their doubles, no
        host sync."""
        keys = _blocks_of(block_keys(mask), self.blocks)
        missed, error, valid = _mask_measures(self.q_rows, kh, keys, self.row_lse, self.valid, mask.slice_m, scale,
                                              self.even_rows)
        return HeadCheck(self.blocks, self.q_rows, self.row_lse, valid, missed[:, :, 0], self.best_missed,
                         error[:, :, 0], self.best_error, self.even_rows)


def flagged_heads(check: HeadCheck) -> list:
    """Heads (ascending) where the checked mask misses more than MISS_RATIO times the mass the
    best mask of its size misses (plus MISS_FLOOR), or its estimated output error exceeds
    ERROR_RATIO times the best mask's (squared, past ERROR_FLOOR squared), on the evenly spread
    blocks or on the widest ones, in any batch entry (one host sync)."""
    errs_more = check.error.square() > (ERROR_RATIO * check.best_error).square() + ERROR_FLOOR**2
    worse = (misses_more(check) | errs_more).any(-1).any(0)
    return [int(h) for h in torch.nonzero(worse).flatten().tolist()]


def misses_more(check: HeadCheck) -> torch.Tensor:
    """bool [B, H, 2]: where the checked mask misses more than MISS_RATIO times the mass the best
    mask of its size misses, plus MISS_FLOOR (flagged_heads' first reading)."""
    return check.missed > MISS_RATIO * check.best_missed + MISS_FLOOR


def check_heads(qh, kh, cheap: SliceMask, predict, scale: float, rule: dict) -> HeadCheck:
    """The check of ``cheap`` (a top-k mask, as block_keys takes) on every head of q, k [B, H, S,
    D]. Both masks' measures come from one sparse call over the checked rows and their doubles.
    NaN logits add no mass to the exact LSE; queries whose exact LSE is not finite, or whose LSE
    over a mask's keys is not (a NaN key kept; a doubled row past its dtype's range), are left
    out. No host sync."""
    slice_m, q_len = cheap.slice_m, qh.shape[2]
    blocks, even_blocks = checked_blocks(qh, kh, slice_m)
    rows, real = _rows_of(blocks, slice_m, q_len)
    # Whole blocks: a repeated last row leaves a block's column max as it is.
    q_rows = qh.gather(2, rows[..., None].expand(-1, -1, -1, qh.shape[3]))
    exact = exact_row_lse(q_rows, kh, scale, twice=True)
    best = predict(q_rows, kh, slice_m, "colmax", lse=exact[:, :, 0], rule="topk", **rule)
    both = torch.cat([_blocks_of(block_keys(cheap), blocks), block_keys(best)], dim=2)  # [B, H, 2n, k]
    valid = real & torch.isfinite(exact).all(2)
    missed, error, valid = _mask_measures(q_rows, kh, both, exact, valid, slice_m, scale, even_blocks * slice_m)
    return HeadCheck(blocks, q_rows, exact, valid, missed[:, :, 0], missed[:, :, 1], error[:, :, 0],
                     error[:, :, 1], even_blocks * slice_m)


def _doubled(q_rows: torch.Tensor) -> torch.Tensor:
    """[B, H, 2R, D]: the rows, then the rows times two (exact in any float dtype short of
    overflow), whose LSE is that of twice the logits: from it, each row's sum of squared
    probabilities."""
    return torch.cat([q_rows, q_rows * 2], dim=2)


def estimated_error(lse: torch.Tensor, row_lse: torch.Tensor) -> tuple:
    """(missed share, squared output error) per row of a mask, from the LSE of each row's logits
    and of twice them, over the mask's keys (``lse`` [..., 2, R]) and over every key
    (``row_lse`` [..., 2, R]). The error is the expected squared distance of the mask's output
    from the dense one over values independent of the scores with unit variance per entry and
    dimension: the missed keys' squared probabilities, plus the kept keys' own output pulled by
    renormalising, the missed share squared times their renormalised squared probabilities.
    A mask that misses a little mass spread thin errs less than one that misses the same mass
    on a few keys; the missed share alone cannot tell them apart."""
    kept, kept_twice = lse.unbind(-2)
    every, every_twice = row_lse.unbind(-2)
    missed = (-torch.expm1(kept - every)).clamp_min(0)
    missed_squares = torch.exp(every_twice - 2 * every) * (-torch.expm1(kept_twice - every_twice)).clamp_min(0)
    return missed, missed_squares + missed.square() * torch.exp(kept_twice - 2 * kept)


def _mask_measures(q_rows, kh, keys, row_lse, valid, slice_m: int, scale: float, even_rows: int) -> tuple:
    """(float32 [B, H, G, 2] the mean share of each row's mass that each of G masks misses, float32
    [B, H, G, 2] the output error it gives relative to the output's spread (the square root of
    the rows' summed ``estimated_error`` over their summed squared probabilities), each over the
    first ``even_rows`` rows and over the rest (0 where a part has none), bool [B, H, R] the
    rows counted: ``valid`` less those whose LSE over a mask's keys is not finite). ``q_rows`` [B, H,
    R, D]: the checked rows; ``row_lse`` [B, H, 2, R]: their exact LSE (``estimated_error``);
    ``keys`` int32 [B, H, G * R / slice_m, k]: each mask's keys of their blocks. One sparse call
    over the rows and their doubles G times each, no host sync."""
    batch, heads, n_blocks, per_row = keys.shape
    groups = n_blocks * slice_m // q_rows.shape[2]
    queries = _doubled(q_rows.repeat(1, 1, groups, 1))
    pair = SliceMask(_even_indptr(batch, heads, 2 * n_blocks, per_row, q_rows.device),
                     keys.repeat(1, 1, 2, 1).reshape(-1), slice_m, 2 * n_blocks * slice_m, kh.shape[2])
    lse = sparse_attention(queries, kh, kh, pair, scale=scale, return_lse=True)[1]
    lse = lse.view(batch, heads, 2, groups, -1).transpose(2, 3)  # [B, H, G, 2, R]
    valid = valid & torch.isfinite(lse).all(-2).all(2)
    missed, squared_error = estimated_error(lse, row_lse.unsqueeze(2))
    spread = torch.exp(row_lse[:, :, 1] - 2 * row_lse[:, :, 0]).unsqueeze(2)  # [B, H, 1, R]
    parts = [slice(0, even_rows), slice(even_rows, None)]

    def part_sums(values):  # [B, H, G, R] -> [B, H, G, 2], over valid rows
        values = torch.where(valid.unsqueeze(2), values, 0.0)
        return torch.stack([values[..., part].sum(-1) for part in parts], -1)

    counts = torch.stack([valid[..., part].sum(-1) for part in parts], -1).unsqueeze(2)
    error = (part_sums(squared_error) / part_sums(spread).clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    return part_sums(missed) / counts.clamp_min(1), error, valid


def exact_row_lse(q_rows, kh, scale: float, workspace_bytes: int = _CHECK_WORKSPACE, *,
                  twice: bool = False) -> torch.Tensor:
    """float32 [B, H, R]: each row's natural-log LSE over every key of kh, NaN logits adding no
    mass (the stats kernel where it runs, else float32 products in chunks of heads or rows whose
    logits stay within ``workspace_bytes``); with ``twice``, [B, H, 2, R]: that and the LSE of
    twice the logits, from the same products."""
    batch, heads, n_rows, dim = q_rows.shape
    on_kernel = _kernel_row_lse(q_rows, kh, scale, twice)
    if on_kernel is not None:
        return on_kernel
    out = torch.empty(batch, heads, 2 if twice else 1, n_rows, dtype=torch.float32, device=q_rows.device)
    row_bytes = 8 * max(1, kh.shape[2])  # the logits and their exponentials
    rows = max(1, min(n_rows, workspace_bytes // row_bytes))
    chunk = max(1, min(heads, workspace_bytes // (row_bytes * max(1, n_rows)))) if rows == n_rows else 1
    for b in range(batch):
        for h0 in range(0, heads, chunk):
            for r0 in range(0, n_rows, rows):
                logits = ref.float32_products(q_rows[b, h0 : h0 + chunk, r0 : r0 + rows],
                                              kh[b, h0 : h0 + chunk]).mul_(scale)
                out[b, h0 : h0 + chunk, 0, r0 : r0 + rows] = ref.nan_free_logsumexp(logits)
                if twice:  # in place: the workspace holds one copy of the logits
                    out[b, h0 : h0 + chunk, 1, r0 : r0 + rows] = ref.nan_free_logsumexp(logits.mul_(2))
    return out if twice else out[:, :, 0]


def _kernel_row_lse(q_rows, kh, scale: float, twice: bool):
    """The stats kernel's row LSE (and of twice the logits), or None where it does not apply
    (lse_estimate.stats_kernel_runs)."""
    if not stats_kernel_runs(q_rows):
        return None
    from .jit.launch import GRID_LIMITS
    from .mask_kernels import gpu_scores

    batch, heads, n_rows, _ = q_rows.shape
    total = batch * heads
    parts = [gpu_scores("stats", q_rows, kh, scale, bh0=bh0, nbh=min(GRID_LIMITS[2], total - bh0), warps=8,
                        squares=twice)
             for bh0 in range(0, total, GRID_LIMITS[2])]
    if twice:
        lse = torch.stack([torch.cat(halves) for halves in zip(*parts)], 1)  # [B * H, 2, R]
        return lse.reshape(batch, heads, 2, n_rows)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(batch, heads, n_rows)

"""Reference (torch, any device) of every mask scorer and selector: the GPU kernels' yardstick.

Definitions (the kernels in cuda_src/mask_score.cu and mask_select.cu implement the same):

* pooled query of a group of ``pool`` consecutive queries (``pooling="mean"``): their float32
  mean, rounded to the input dtype (the tensor-core kernel consumes it in that dtype); or
  (``"sample"``) the group's middle query itself (``sample_rows``), whose max-prob scores are
  then dilated along the key axis by pool // 2 either side (``dilate_keys``): the group's other
  queries sit up to pool / 2 tokens away and, under relative positions, look at keys shifted by
  as much; or (``"both"``) the geometric mean of the two max-prob scores, each with its own
  exact band: a key must look likely to the mean and to the samples; or (``"adaptive"``) per
  query block, the middle queries where the block's coherence (``block_coherence``) is below
  ``COHERENCE_CUT`` and the mean queries elsewhere: a block whose queries point different ways
  has a mean that stands for none of them;
* mean-query logits: ``scale * pooled_q . k`` in float32 for every key, and their row LSE;
  stored logits (``logits_dtype``) are then rounded to that dtype (the LSE stays exact);
* a pooled row's LSE (the normaliser of its max-prob scores and the sub-block's mass in the exact
  band) is estimated from every ``LSE_KEY_STRIDE``-th key, scaled to the row's length
  (``sampled_lse``; every key for rows shorter than ``LSE_STRIDE_MIN_KEYS``);
* max-prob scores of a group of rows: ``max_row exp(logit - lse[row])`` (0 where lse is not
  finite), stored as ``PROB_DTYPE`` (bfloat16, rounded toward zero: ``stored_probs``; half the
  memory traffic of float32 in every pass over the score rows; the rounding is monotone, so
  maxima taken later, the dilation and the exact band, commute with it, and only keys whose
  scores agree to within 2^-7 can change places); with one query per row, its attention LSE
  and the group = the query block, this is the exact column-max score of a dense step;
* exact band (``exact_band`` = L): on keys [j*M - L, (j+1)*M + L) of query block j, the
  pooled max-prob score is raised to the exact one, max over the block's queries of
  exp(logit - lse~), lse~ = logaddexp(the query's LSE over those keys, its sub-block's LSE):
  near the diagonal, where pooling blurs most, every query speaks for itself;
* diagonals (``diagonals`` = shifts d): the same on keys [j*M - L + d, (j+1)*M + L + d), each
  band with its own band LSE: where a head's attention sits at fixed offsets from the query
  (the same place one or more frames away), those keys too are scored exactly;
* selection: keys ranked band first, then score descending, then index ascending (scores
  compared through the float total order: NaN lowest, -0 == +0); keep the first n keys with
  n = k (top-k), the band plus the keys scoring >= the threshold (for logit rows: logit >=
  lse + log(threshold), i.e. probability >= threshold), or the fewest whose mass reaches tau
  of the row's mass within a relative TAU_SLACK (mass = exp(logit - lse) or the score
  itself); n clamped to [max(min_keys, band size), max_keys]. The band of query block j is
  keys [j*M - local, (j+1)*M + local).
"""

from __future__ import annotations

import math

import torch

from .e4m3 import e4m3_rounded
from .mask import SliceMask, num_blocks

RULES = ("topk", "tau", "threshold")
BAND_KEY = 0xFFFFFFFF
#: "Reaches tau" allows this relative error, so float32 sums on the GPU agree (tau = 1 keeps
#: all but a tail of at most this fraction of the mass, not the zero-mass keys that float
#: rounding would drag in).
TAU_SLACK = 1e-5
#: How max-probability scores are stored between the kernels (see "max-prob scores" above).
PROB_DTYPE = torch.bfloat16
#: A pooled row's LSE from every 8th key: the stats pass reads an eighth of the keys, and no
#: head family's error ratio moved by more than 0.03 (notes/MEASURED.md "Mask quality").
LSE_KEY_STRIDE = 8
LSE_STRIDE_MIN_KEYS = 4096


def stored_probs(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` as the kernels store it in PROB_DTYPE: bfloat16 rounded toward zero (the
    high half of each float's bits, which costs the kernels no conversion instruction), as
    float32."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


#: Blocks whose coherence (``block_coherence``) is below this are scored by sampled queries
#: under pooling "adaptive". Heads that look a few tokens around each query
#: measure 0.1-0.35 (their queries turn with position), heads whose blocks share a target
#: (sinks, text, broad or region-mixed heads) 0.45 and up (notes/PERF.md, session 18).
COHERENCE_CUT = 0.4


#: torch.bmm(..., out_dtype=) exists (torch 2.8 on).
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def float32_products(q_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float32 [N, R, S] products of q_rows [N, R, D] with k [N, S, D]. On CUDA, half-precision
    operands go to the tensor cores as they are, accumulated and returned in float32 (the same
    values as a float32 product, without a float32 copy of every key)."""
    if _BMM_OUT_DTYPE and q_rows.is_cuda and q_rows.dtype in (torch.bfloat16, torch.float16) and k.dtype == q_rows.dtype:
        return torch.bmm(q_rows, k.transpose(-1, -2), out_dtype=torch.float32)
    return torch.matmul(q_rows.float(), k.float().transpose(-1, -2))


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def pool_queries(q: torch.Tensor, pool: int) -> torch.Tensor:
    """float32 [B, H, ceil(S / pool), D]: mean of each run of ``pool`` queries (last run shorter)."""
    batch, heads, seq, dim = q.shape
    full = seq // pool
    out = torch.empty(batch, heads, -(-seq // pool), dim, dtype=torch.float32, device=q.device)
    if full:
        torch.mean(q[:, :, : full * pool].unflatten(2, (full, pool)), 3, dtype=torch.float32, out=out[:, :, :full])
    if seq > full * pool:
        torch.mean(q[:, :, full * pool :], 2, keepdim=True, dtype=torch.float32, out=out[:, :, full:])
    return out


def sample_rows(q_len: int, pool: int, device=None) -> torch.Tensor:
    """int64 [ceil(q_len / pool)]: the middle query of each group of ``pool`` (the last query
    for a short last group that ends before its middle)."""
    groups = num_blocks(q_len, pool)
    return (torch.arange(groups, device=device) * pool + pool // 2).clamp_max(q_len - 1)


def block_coherence(q: torch.Tensor, slice_m: int) -> torch.Tensor:
    """float32 [B, H, QB]: each block's mean resultant length, the norm of its queries' mean over
    the mean of their norms (1: all alike; near 0: they point every way; 0 for zero queries).
    It is the queries' mean cosine similarity to their mean where their norms agree, and costs
    two reductions over the queries."""
    return coherence_of(q, pool_queries(q, slice_m), slice_m, slice_m)


def coherence_of(q: torch.Tensor, means: torch.Tensor, pool: int, slice_m: int) -> torch.Tensor:
    """``block_coherence`` from ``means`` = pool_queries(q, pool) (pool dividing slice_m), so a
    prediction that pools its sub-blocks anyway reads the queries once more, for their norms
    (mask_kernels.gpu_adaptive_rows does both in one read)."""
    batch, heads, q_len, _ = q.shape
    q_blocks = num_blocks(q_len, slice_m)
    if q_len == 0:
        return torch.zeros(batch, heads, 0, dtype=torch.float32, device=q.device)
    group = slice_m // pool
    sums = means * float(pool)  # each sub-block's sum of queries (the last may hold fewer)
    sums[:, :, -1] *= (q_len - (means.shape[2] - 1) * pool) / pool
    sums = torch.nn.functional.pad(sums, (0, 0, 0, q_blocks * group - means.shape[2]))
    sums = sums.view(batch, heads, q_blocks, group, q.shape[-1]).sum(3)
    norms = torch.linalg.vector_norm(q, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).float()
    pad = q_blocks * slice_m - q_len
    norm_sums = torch.nn.functional.pad(norms, (0, pad)).view(batch, heads, q_blocks, slice_m).sum(-1)
    sum_norm = torch.linalg.vector_norm(sums, dim=-1)  # |mean| / mean |q|, both times the count
    return torch.where(norm_sums > 0, sum_norm / torch.where(norm_sums > 0, norm_sums, 1.0), 0.0)


def adaptive_rows(q: torch.Tensor, pool: int, slice_m: int) -> tuple:
    """(rows [B, H, ceil(S / pool), D] in q's dtype, sampled bool [B, H, QB]) of pooling
    "adaptive": each sub-block's middle query where its block's coherence is below
    COHERENCE_CUT (``sampled``), else its mean query rounded to q's dtype."""
    means = pool_queries(q, pool)
    # Not above the cut, NaN included: an infinite query (inf / inf) must not make its block's
    # rows the mean, which it would turn infinite.
    sampled = ~(coherence_of(q, means, pool, slice_m) >= COHERENCE_CUT)
    middles = q.index_select(2, sample_rows(q.shape[2], pool, q.device))
    per_row = sampled.repeat_interleave(slice_m // pool, 2)[:, :, : means.shape[2]]
    return torch.where(per_row.unsqueeze(-1), middles, means.to(q.dtype)), sampled


def dilate_keys(scores: torch.Tensor, width: int, kv_len: int | None = None) -> torch.Tensor:
    """Each key's score raised to the max over keys [j - width, j + width] of its row; only the
    first ``kv_len`` entries of the last axis (default: all) are keys, the rest is returned
    unspecified. A new tensor."""
    kv_len = scores.shape[-1] if kv_len is None else kv_len
    out = torch.empty_like(scores)
    if width == 0 or kv_len == 0:
        out[..., :kv_len] = scores[..., :kv_len]
        return out
    rows = scores[..., :kv_len].reshape(-1, 1, kv_len)
    # max_pool1d pads with -inf and takes at most half its window as padding.
    pooled = torch.nn.functional.max_pool1d(rows, 2 * width + 1, stride=1, padding=width)
    out[..., :kv_len] = pooled.reshape(*scores.shape[:-1], kv_len)
    return out


def rounded(x: torch.Tensor, dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` when that is a 16-bit float, as float32."""
    return x.to(dtype).float() if dtype in (torch.bfloat16, torch.float16) else x.float()


def logits_and_lse(rows: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024):
    """float32 logits [B, H, R, S] = scale * rows . k and their LSE [B, H, R]."""
    kf = k.float()
    logits = torch.empty(*rows.shape[:3], k.shape[2], dtype=torch.float32, device=rows.device)
    for r0 in range(0, rows.shape[2], chunk):
        logits[:, :, r0 : r0 + chunk] = torch.matmul(rows[:, :, r0 : r0 + chunk].float(), kf.transpose(-1, -2)) * scale
    return logits, nan_free_logsumexp(logits)


def nan_free_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim with NaN logits (a NaN query or key) adding no mass, as in
    the kernels' sums."""
    return torch.logsumexp(logits.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf), dim=-1)


def lse_key_stride(kv_len: int) -> int:
    """Every how many keys a pooled row's LSE is estimated from (``sampled_lse``)."""
    return LSE_KEY_STRIDE if kv_len >= LSE_STRIDE_MIN_KEYS else 1


def lse_key_sample(k: torch.Tensor) -> tuple:
    """(the strided view of k [B, H, S, D] a pooled row's LSE is taken over, the log of the keys
    per sampled key that the sample's LSE is raised by): what ``sampled_lse`` and the GPU's stats
    pass share."""
    sampled = k[:, :, :: lse_key_stride(k.shape[2])]
    return sampled, math.log(k.shape[2] / max(sampled.shape[2], 1))


def sampled_lse(rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 [B, H, R]: each row's LSE over every ``lse_key_stride``-th key, plus the log of
    the keys per sampled key (the row's mass estimated from a strided sample)."""
    sampled, log_factor = lse_key_sample(k)
    return logits_and_lse(rows, sampled, scale)[1] + log_factor


def probabilities(logits: torch.Tensor, row_lse: torch.Tensor) -> torch.Tensor:
    """exp(logits - row_lse) of float32 scaled ``logits`` [..., R, S] and their rows' LSE
    [..., R, 1]: 0 for a row whose LSE is not finite (no key), and NaN (a NaN query or key)
    adds nothing, as the kernels' fmaxf reads it."""
    finite = torch.isfinite(row_lse)
    probs = torch.where(finite, torch.exp(logits - torch.where(finite, row_lse, 0.0)), 0.0)
    return probs.nan_to_num_(nan=0.0)


def maxprob_scores(rows: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, group: int, scale: float,
                   chunk: int = 1024, exact: bool = False) -> torch.Tensor:
    """float32 [B, H, ceil(R / group), S]: per group of rows, the max softmax probability as the
    kernels store it (``stored_probs``), or unrounded with ``exact``."""
    batch, heads, n_rows, _ = rows.shape
    out_rows = num_blocks(n_rows, group)
    out = torch.zeros(batch, heads, out_rows, k.shape[2], dtype=torch.float32, device=rows.device)
    kf = k.float()
    chunk = max(group, chunk - chunk % group)
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        logits = torch.matmul(rows[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        probs = probabilities(logits, lse[:, :, r0:r1].float().unsqueeze(-1))
        pad = (-probs.shape[2]) % group
        if pad:
            probs = torch.cat([probs, probs.new_zeros(batch, heads, pad, probs.shape[3])], 2)
        out[:, :, r0 // group : r0 // group + probs.shape[2] // group] = probs.unflatten(2, (-1, group)).amax(3)
    return out if exact else stored_probs(out)


def band_bounds(block: int, slice_m: int, band: int, kv_len: int, shift: int = 0) -> tuple:
    """Keys [lo, hi) of query block ``block``'s exact band: the block's own keys and ``band``
    more on either side, moved by ``shift`` keys (a diagonal), clipped to the keys."""
    lo = min(max(0, block * slice_m - band + shift), kv_len)
    return lo, max(lo, min(kv_len, (block + 1) * slice_m + band + shift))


def refine_band(scores: torch.Tensor, q, k, sub_lse: torch.Tensor, pool: int, slice_m: int, band: int,
                scale: float, shift: int = 0) -> torch.Tensor:
    """Raise ``scores`` [B, H, QB, S] (pooled max-prob scores) on each block's band (moved by
    ``shift`` keys) to the exact column maxima: max over the block's queries of exp(logit - lse~),
    where a query's lse~ is the log of its band mass plus its sub-block's total mass (logaddexp
    of the band LSE and ``sub_lse`` [B, H, R] of the sub-block holding it). Returns a new tensor."""
    out = scores.clone()
    q_len, kv_len = q.shape[2], k.shape[2]
    kf = k.float()
    for j in range(scores.shape[2]):
        q0, q1 = j * slice_m, min(q_len, (j + 1) * slice_m)
        k0, k1 = band_bounds(j, slice_m, band, kv_len, shift)
        if k1 <= k0:
            continue
        logits = torch.matmul(q[:, :, q0:q1].float(), kf[:, :, k0:k1].transpose(-1, -2)) * scale
        own = sub_lse[:, :, torch.arange(q0, q1, device=q.device) // pool]
        total = torch.logaddexp(nan_free_logsumexp(logits), own.float())
        probs = stored_probs(torch.exp(logits - total.unsqueeze(-1)).nan_to_num(nan=0.0).amax(2))
        out[:, :, j, k0:k1] = torch.maximum(out[:, :, j, k0:k1], probs)  # NaN queries ignored, as fmaxf does
    return out


def raw_subblock_scores(q, k, pool: int, slice_m: int, scale: float, pooling: str) -> tuple:
    """(float32 [B, H, QB, S] max-prob scores, their rows' LSE [B, H, R]) of sub-blocks scored
    by their mean query ("mean"), their middle query with dilated scores ("sample"), or per
    block the one or the other ("adaptive")."""
    if pooling == "adaptive":
        rows, sampled = adaptive_rows(q, pool, slice_m)
    elif pooling == "sample":
        rows = q[:, :, sample_rows(q.shape[2], pool, q.device)]
    else:
        rows = rounded(pool_queries(q, pool), q.dtype)
    sub_lse = sampled_lse(rows, k, scale)
    scores = maxprob_scores(rows, k, sub_lse, slice_m // pool, scale)
    if pooling == "sample":
        scores = dilate_keys(scores, pool // 2)
    elif pooling == "adaptive":
        scores = torch.where(sampled.unsqueeze(-1), dilate_keys(scores, pool // 2), scores)
    return scores, sub_lse


def pooled_scores(q, k, pool: int, slice_m: int, exact_band, scale: float, pooling: str,
                  diagonals: tuple = ()) -> torch.Tensor:
    """The scores of a sub-block prediction: ``pooling`` "mean", "sample" or "adaptive"
    (raw_subblock_scores), or "both" (the geometric mean of "mean" and "sample"); raised to the
    exact column maxima on each block's band, with the scored rows' LSE standing for the rest of
    a query's mass (the mean rows' with "both"), and then on the same band moved by each of
    ``diagonals`` (each with its own band LSE)."""
    scores, sub_lse = raw_subblock_scores(q, k, pool, slice_m, scale, "mean" if pooling == "both" else pooling)
    if pooling == "both":
        scores = stored_probs(torch.sqrt(scores * raw_subblock_scores(q, k, pool, slice_m, scale, "sample")[0]))
    if exact_band is not None:
        for shift in (0, *diagonals):
            scores = refine_band(scores, q, k, sub_lse, pool, slice_m, exact_band, scale, shift)
    return scores


def colmax_scores(q, k, lse, slice_m: int, scale: float, exact: bool = False) -> torch.Tensor:
    """Exact column max of a dense step: [B, H, QB, S] = max over each block's queries of p
    (stored as ``maxprob_scores`` has it, or unrounded with ``exact``)."""
    return maxprob_scores(q, k, lse, slice_m, scale, exact=exact)


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 order keys of float32 values: the float total order as an unsigned (NaN -> 0)."""
    bits = values.contiguous().float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.where((bits << 1) & 0xFFFFFFFF == 0, torch.zeros_like(bits), bits)  # -0 -> +0
    negative = bits >= 0x80000000
    keys = torch.where(negative, 0xFFFFFFFF - bits, bits | 0x80000000)
    return torch.where(torch.isnan(values), torch.zeros_like(keys), keys)


def band_mask(q_blocks: int, kv_len: int, slice_m: int, local, device=None) -> torch.Tensor:
    """bool [QB, S]: the diagonal band of each query block (all False when local is None)."""
    keys = torch.arange(kv_len, device=device)
    if local is None:
        return torch.zeros(q_blocks, kv_len, dtype=torch.bool, device=device)
    j = torch.arange(q_blocks, device=device).unsqueeze(1)
    return (keys >= j * slice_m - local) & (keys < (j + 1) * slice_m + local)


def select(values: torch.Tensor, rule: str, *, lse=None, k=None, tau=None, threshold=None, min_keys: int = 0,
           max_keys=None, band=None) -> torch.Tensor:
    """bool [..., R, S]: the kept keys of each row (see the module docstring).

    ``values``: float32 scores; ``lse`` [..., R] marks them as logits (else probabilities);
    ``band``: bool [R, S] (or broadcastable) of keys ranked first.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    values = values.float()
    shape = values.shape
    kv_len = shape[-1]
    flat = values.reshape(-1, kv_len)
    band_flat = (torch.zeros_like(flat, dtype=torch.bool) if band is None
                 else band.to(flat.device).expand(shape).reshape(-1, kv_len))
    keys = torch.where(band_flat, torch.full_like(flat, BAND_KEY, dtype=torch.int64), order_keys(flat))
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices
    band_count = band_flat.sum(-1)
    if rule == "topk":
        n = torch.full_like(band_count, int(k))
    elif rule == "threshold":
        if lse is not None:
            vthr = lse.reshape(-1).float() + torch.tensor(math.log(threshold), dtype=torch.float32)
        else:
            vthr = torch.full((flat.shape[0],), threshold, dtype=torch.float32)
        above = (keys >= order_keys(vthr.to(flat.device)).unsqueeze(1)) & ~band_flat
        n = band_count + above.sum(-1)
    else:
        if lse is not None:
            mass = torch.exp(flat.double() - lse.reshape(-1, 1).double())
        else:
            mass = flat.double().clamp_min(0.0)
        mass = torch.nan_to_num(mass, nan=0.0)
        sorted_mass = torch.gather(mass, 1, order)
        running = torch.cumsum(sorted_mass, 1)
        target = tau * running[:, -1:] * (1 - TAU_SLACK)
        reached = running >= target
        n = torch.where(reached.any(1), reached.to(torch.int8).argmax(1) + 1, torch.full_like(band_count, kv_len))
    lo = band_count.clamp_min(max(min_keys, 0)).clamp_max(kv_len)
    hi = torch.full_like(lo, kv_len if max_keys is None else min(max(max_keys, 0), kv_len))
    hi = torch.maximum(hi, lo)
    n = torch.minimum(torch.maximum(n, lo), hi)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(kv_len, device=flat.device).expand_as(order).contiguous())
    return (rank < n.unsqueeze(1)).reshape(shape)


def select_union(values, rule, group: int, *, band=None, **kwargs) -> torch.Tensor:
    """bool [B, H, ceil(R / group), S]: union over groups of rows of their selections (no band),
    plus ``band`` [QB, S]."""
    kept = select(values, rule, **kwargs)
    pad = (-kept.shape[2]) % group
    if pad:
        kept = torch.cat([kept, kept.new_zeros(*kept.shape[:2], pad, kept.shape[3])], 2)
    union = kept.unflatten(2, (-1, group)).any(3)
    return union | band if band is not None else union


def predict_mask_reference(q, k, slice_m: int, method: str, *, rule="topk", top_k=None, tau=None, threshold=None,
                           pool=None, combine="max", min_keys=0, max_keys=None, local=None, lse=None,
                           scale=None, logits_dtype=torch.float32, exact_band=None, pooling="mean",
                           diagonals=(), candidates=None, products="input") -> SliceMask:
    """The whole prediction on any device ([B, H, S, D] inputs): scores, selection, SliceMask.
    ``candidates`` (colmax; bool [B, H, QB, S]): only those keys are scored, the others score 0.
    ``products`` (colmax): "e4m3" scores q and k rounded as fgcupy.e4m3 rounds them."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    scale = default_scale(dim) if scale is None else scale
    q_blocks = num_blocks(q_len, slice_m)
    band = band_mask(q_blocks, kv_len, slice_m, local, q.device) if local is not None else None
    sel = dict(k=top_k, tau=tau, threshold=threshold, min_keys=min_keys, max_keys=max_keys)
    if method == "colmax":
        if products == "e4m3":
            q, k = e4m3_rounded(q), e4m3_rounded(k)
        scores = colmax_scores(q, k, lse, slice_m, scale)
        if candidates is not None:
            scores = scores.masked_fill(~candidates.to(scores.device), 0.0)
        keep = select(scores, rule, band=band, **sel)
    else:
        pool = slice_m if pool is None else pool
        if exact_band is not None or pooling != "mean" or (pool < slice_m and combine == "max"):
            keep = select(pooled_scores(q, k, pool, slice_m, exact_band, scale, pooling, diagonals), rule, band=band,
                          **sel)
        else:  # stored logits: one mean query per block, or the union of sub-block selections
            logits, row_lse = logits_and_lse(rounded(pool_queries(q, pool), q.dtype), k, scale)
            if pool == slice_m:
                keep = select(rounded(logits, logits_dtype), rule, lse=row_lse, band=band, **sel)
            else:
                keep = select_union(rounded(logits, logits_dtype), rule, slice_m // pool, band=band, lse=row_lse,
                                    **sel)
    return SliceMask.from_dense(keep, slice_m, q_len)

"""Per-head choice of the cheap predictor's pooling.

No one pooling is best everywhere: mean queries rank a spatial head's keys best, sampled
queries a head that looks along time (notes/MEASURED.md "Mask quality"). :func:`calibrate` predicts each
candidate's mask and keeps, per head, the one whose kept slices hold the most attention: given
a dense step's row LSE (the exact schedule's refresh, ``fgcupy.attention.dense_attention_with_lse``,
or any dense attention that returns it), the most exact column-max mass (the oracle's own score);
without one, the most probability of a few sampled queries per block (exact softmax rows of
them, a small fraction of a dense step). The choice goes to ``predict_mask(method="topk", pooling=...)`` on
later steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .mask import SliceMask, is_int, num_blocks
from .layout import query_key_views
from .mask_algebra import concat_heads
from .mask_kernels import gpu_colmax
from .mask_reference import colmax_scores, nan_free_logsumexp
from .mask_request import POOLINGS
from .scoring import checked_lse, predict_mask

DEFAULT_CANDIDATES = ("mean", "both")
#: Sampled queries per query block when no dense step's LSE is given (16: at blocks of 128 the
#: choice matched the column-max one on every head family where 4 and 8 queries still differed).
DEFAULT_SAMPLES = 16


def exact_colmax(q, k, lse, slice_m: int, scale: float) -> torch.Tensor:
    """[B, H, QB, KV]: the exact column maxima of a dense step, rounded to bfloat16 as the
    scoring kernels store them (the kernel's max-probability pass on CUDA, as
    predict_mask(method="colmax") runs it, a bfloat16 view; the reference else, float32)."""
    if q.device.type != "cuda":
        return colmax_scores(q, k, lse, slice_m, scale)
    batch, heads, q_len, _ = q.shape
    scores = gpu_colmax(q, k, scale, lse.reshape(batch * heads, q_len), slice_m)
    return scores[..., : k.shape[2]].reshape(batch, heads, -1, k.shape[2])


def captured_colmax(colmax: torch.Tensor, mask) -> torch.Tensor:
    """float64 [H]: per head, the exact column-max mass (summed over batch and blocks) on the
    slices ``mask`` keeps; ``colmax`` [B, H, QB, KV] as from mask_reference.colmax_scores."""
    kept = mask.to_dense().to(colmax.device)
    # Head by head: a temporary the size of one head's scores, not of all of them in float64.
    return torch.stack([torch.where(kept[:, h], colmax[:, h], 0.0).sum(dtype=torch.float64)
                        for h in range(colmax.shape[1])])


@dataclass(frozen=True)
class Calibration:
    """What one calibration gives: the pooling per head and the mask of that choice (head h from
    its pooling's prediction), for the steps until the next refresh."""

    poolings: list
    mask: SliceMask


def default_samples(slice_m: int) -> int:
    """DEFAULT_SAMPLES, or the most queries up to it that divide a block of ``slice_m`` evenly."""
    return math.gcd(DEFAULT_SAMPLES, slice_m)


def probe_queries(q_len: int, slice_m: int, per_block: int) -> torch.Tensor:
    """int64 [QB, per_block]: the queries ``sampled_mass`` reads, ``per_block`` per query block,
    a quarter of the way into each of its equal parts (away from the parts' middles, the queries
    pooling "sample" scores exactly, so the judge does not favour it). The last block's may pass
    q_len (they are left out)."""
    if not is_int(per_block) or per_block < 1 or slice_m % per_block:
        raise ValueError(f"per_block must be a positive divisor of slice_m={slice_m}, got {per_block}")
    part = slice_m // per_block
    within = torch.arange(per_block) * part + part // 4
    return torch.arange(num_blocks(q_len, slice_m))[:, None] * slice_m + within


def sampled_mass(q, k, masks, slice_m: int, scale: float, per_block: int | None = None) -> torch.Tensor:
    """float64 [len(masks), H]: per mask and head, the attention probability that sampled queries
    (``probe_queries``) put on the slices the mask keeps, summed over batch and queries: the mass
    a mask holds, read off exact softmax rows of a few queries (per_block / slice_m of a dense
    step's QK^T, one head at a time; only the kept keys' probabilities are formed)."""
    batch, heads, q_len, _ = q.shape
    per_block = default_samples(slice_m) if per_block is None else per_block
    positions = probe_queries(q_len, slice_m, per_block).to(q.device)
    q_blocks = positions.shape[0]
    valid = (positions < q_len).to(torch.float32)
    rows = positions.clamp(max=q_len - 1).reshape(-1)
    kept = []
    for mask in masks:  # (block, key) pairs of each head, rows in order, and where each head's start
        row, key = mask.flat_rows()
        per_head = mask.row_lengths().reshape(-1, q_blocks).sum(1, dtype=torch.int64)
        kept.append((row % q_blocks, key, [0] + torch.cumsum(per_head, 0).tolist()))
    mass = torch.zeros(len(masks), heads, dtype=torch.float64, device=q.device)  # read back once
    for b in range(batch):
        for h in range(heads):
            logits = torch.matmul(q[b, h, rows].float(), k[b, h].float().T) * scale  # [QB * per_block, KV]
            lse = nan_free_logsumexp(logits).view(q_blocks, per_block)
            logits = logits.view(q_blocks, per_block, -1)
            for i, (block, key, starts) in enumerate(kept):
                lo, hi = starts[b * heads + h], starts[b * heads + h + 1]
                blk, kk = block[lo:hi], key[lo:hi]
                probs = torch.exp(logits[blk, :, kk] - lse[blk]).nan_to_num(nan=0.0) * valid[blk]  # NaN keys: none
                mass[i, h] += probs.sum(dtype=torch.float64)
    return mass.cpu()


def calibrate(q, k, lse=None, slice_m: int = 128, *, candidates=DEFAULT_CANDIDATES, scale: float | None = None,
              per_block: int | None = None, layout: str = "HND", **predict_kwargs) -> Calibration:
    """The pooling of ``candidates`` whose mask holds the most attention, per head, and the mask
    those choices give (joined from the candidates' predictions: nothing predicted twice).

    q, k: [B, H, S, D] ("HND") or [B, S, H, D] ("NHD"), torch or cupy. With ``lse`` (float32 [B, H, q_len], a dense step's natural-log
    row LSE) "most attention" is the most exact column-max mass: a column-max pass (the scoring
    kernel on CUDA, float32 torch on the CPU) whose float32 scores, B x H x ceil(q_len / slice_m)
    x kv_len of them, are kept (1.3 GB for 40 heads of 32,760 tokens). Without it, the most
    probability of ``per_block`` sampled queries per block (``sampled_mass``): no dense step.
    ``predict_kwargs``: the predict_mask options the choice is for (e.g. density=0.1); one
    prediction per candidate.
    """
    q, k = query_key_views(q, k, layout)
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a sequence of pooling names, not one str: got {candidates!r}")
    candidates = tuple(candidates)  # iterated more than once
    if not candidates or any(c not in POOLINGS for c in candidates):
        raise ValueError(f"candidates must be one or more of {POOLINGS}, got {candidates!r}")
    if "pooling" in predict_kwargs or predict_kwargs.get("method", "topk") != "topk":
        raise ValueError("calibrate compares the masks of its candidates at equal size: top-k only (density or "
                         "top_k); predict_kwargs may not set pooling or another method")
    if lse is not None:
        lse = checked_lse(lse, q)
        if per_block is not None:
            raise ValueError("per_block sets the sampled queries of a calibration without lse; with lse every "
                             "query counts")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    predict_kwargs = dict(predict_kwargs, method="topk")
    masks = [predict_mask(q, k, slice_m, pooling=c, scale=scale, **predict_kwargs) for c in candidates]
    if lse is None:
        captured = sampled_mass(q, k, masks, slice_m, scale, per_block)
    else:
        colmax = exact_colmax(q, k, lse, slice_m, scale)
        captured = torch.stack([captured_colmax(colmax, m) for m in masks])  # [candidates, H]
    heads = q.shape[1]
    if heads == 0:  # nothing to choose: every candidate's mask is the same empty one
        return Calibration([], masks[0])
    chosen = captured.argmax(0).tolist()
    if len(set(chosen)) == 1:
        mask = masks[chosen[0]]
    else:
        mask = concat_heads(masks, order=[c * heads + h for h, c in enumerate(chosen)])
    return Calibration([candidates[c] for c in chosen], mask)


def calibrate_pooling(q, k, lse=None, slice_m: int = 128, **options) -> list:
    """``calibrate(...).poolings``: the pooling per head, for ``predict_mask(method="topk", pooling=...)``."""
    return calibrate(q, k, lse, slice_m, **options).poolings

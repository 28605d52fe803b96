"""Per-head choice of the cheap predictor's pooling, from one dense step's LSE.

No one pooling is best everywhere: mean queries rank a spatial head's keys best, sampled
queries a head that looks along time (README "Mask quality"). Given a dense step's row LSE (the
exact schedule's refresh, ``fgcupy.attention.dense_attention_with_lse``, or any dense attention
that returns it), :func:`calibrate` predicts each candidate's mask and keeps, per head,
the one whose kept slices hold the most exact column-max mass (the oracle's own score, so no
values and no attention output are needed). The result goes to ``predict_mask(pooling=...)`` on
later steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .mask import SliceMask
from .mask_algebra import concat_heads
from .mask_kernels import gpu_colmax
from .mask_reference import colmax_scores
from .mask_request import POOLINGS
from .scoring import predict_mask

DEFAULT_CANDIDATES = ("mean", "both")


def exact_colmax(q, k, lse, slice_m: int, scale: float) -> torch.Tensor:
    """float32 [B, H, QB, KV]: the exact column maxima of a dense step (the scoring kernel's
    max-probability pass on CUDA, as predict_mask(method="colmax") runs it; the reference else)."""
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


def calibrate(q, k, lse, slice_m: int = 128, *, candidates=DEFAULT_CANDIDATES, scale: float | None = None,
              **predict_kwargs) -> Calibration:
    """The pooling of ``candidates`` whose mask holds the most exact column-max mass, per head,
    and the mask those choices give (joined from the candidates' predictions: nothing predicted
    twice).

    q, k: [B, H, S, D] (torch); lse: float32 [B, H, q_len], their dense step's natural-log row
    LSE; ``predict_kwargs``: the predict_mask options the choice is for (e.g. density=0.1).
    Runs a column-max pass (the scoring kernel on CUDA, float32 torch on the CPU) and keeps its
    float32 scores, B x H x ceil(q_len / slice_m) x kv_len of them (1.3 GB for 40 heads of 32,760
    tokens), and one prediction per candidate.
    """
    if not candidates or any(c not in POOLINGS for c in candidates):
        raise ValueError(f"candidates must be one or more of {POOLINGS}, got {candidates!r}")
    if "pooling" in predict_kwargs or predict_kwargs.get("method") == "colmax":
        raise ValueError("calibrate_pooling chooses pooling for a mean-query method: predict_kwargs may not set "
                         "pooling or method='colmax'")
    lse = torch.as_tensor(lse)
    if tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be [B, H, q_len] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    colmax = exact_colmax(q, k, lse.float(), slice_m, scale)
    masks = [predict_mask(q, k, slice_m, pooling=c, scale=scale, **predict_kwargs) for c in candidates]
    captured = torch.stack([captured_colmax(colmax, m) for m in masks])  # [candidates, H]
    chosen = captured.argmax(0).tolist()
    heads = q.shape[1]
    if len(set(chosen)) == 1:
        mask = masks[chosen[0]]
    else:
        mask = concat_heads(masks, order=[c * heads + h for h, c in enumerate(chosen)])
    return Calibration([candidates[c] for c in chosen], mask)


def calibrate_pooling(q, k, lse, slice_m: int = 128, **options) -> list:
    """``calibrate(...).poolings``: the pooling per head, for ``predict_mask(pooling=...)``."""
    return calibrate(q, k, lse, slice_m, **options).poolings

"""How close can a cheap predictor get to the oracle? Idealised predictors on the hard families.

    PYTHONPATH=. python -m tools.probe_mask_limits [--grid 5x30x52] [--heads 2] [--families ...]

Each line is error / oracle error (fgcupy.oracle.Judge, top-k at d = 0.1 and 0.3) of a
predictor that is given more than a real one has, so a real predictor of that kind can do no
better:
* "column sum": keys ranked by the block's summed probability (a different yardstick than the
  oracle's column max; about 1.0 means the two agree);
* "colmax dilated 1": the exact column maxima widened by one key either side (what dilation
  costs even on exact scores);
* "every 2nd/8th query": the exact column max over a subset of the block's queries, with their
  exact LSE (8th: dilated by 4 keys);
* "exact on top C": the default "both" scores, with the exact column max on each block's top C
  fraction of keys by those scores (a two-stage predictor whose second stage is free);
* "exact on frames +-F": the default scores (mean queries of 32, exact band of 64), with the
  exact column max also on the block's keys +-64 in the F frames before and after it (bands at
  multiples of the frame size, as a predictor told the video grid could place them);
* "default adaptive": the shipped default (pooling "adaptive"); "default": its pooling "mean"
  (mean queries of 32 and the exact band, the default before "adaptive"); "both 32 + band 64":
  its pooling "both" (real predictors);
* "mean of P + band 64": the default's scoring itself with sub-blocks of P queries instead of
  32 (a real predictor; its scoring work grows as 32 / P times the default's);
* "..., per-head budget": the exact column max, and the shipped default (pooling "adaptive"),
  selected per head instead of per block: the head's d x blocks x keys highest scores, so
  blocks keep different numbers of keys at the same density (does a mass-like rule help?);
* "colmax, estimated LSE" (``predict_mask(method="colmax", lse="estimate")``, a real predictor
  that needs no dense step) and its estimate's two parts alone: each query's LSE over its
  block's band only ("band LSE only"), or its sampled mass outside the band only ("far-sample
  LSE only");
* "mean of 32 + spread + band 64": the default's mean queries with each key's logit raised by
  s^2 / 2 x (the sub-block's mean per-entry query variance) x |k|^2, the second cumulant of the
  sub-block's logits if its queries spread alike in every direction (a log of the sub-block's
  summed exp-logits, not of its mean query's), max-probability by each row's own LSE, with the
  exact band: what such a term would buy a real predictor (one more scalar per row and per key);
* "best per block of ...": each query block takes whichever of those real predictors' masks
  gives it the least output error (the squared error splits over blocks), a bound for any
  per-block choice among them;
* "estimated column max on the best N of QB blocks": per head, the N query blocks (each of
  BUDGET_FRACTIONS of them, rounded) where the estimated column max's mask lowers the error most
  against the default's take it, the rest keep the default's (an ideal choice, a bound for any
  rule spending the exact work on N blocks), and beside it the N least coherent blocks
  (mask_reference.block_coherence).
Runs on the CPU (torch reference) or on a GPU (--device cuda).
"""

from __future__ import annotations

import argparse
import functools
import math

import torch

from fgcupy import mask_reference as ref
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.lse_estimate import ESTIMATE_BAND, lse_parts
from fgcupy.mask import SliceMask
from fgcupy.oracle import Judge, keys_for
from fgcupy.reference import reference_attention
from fgcupy.workloads import VideoShape

SLICE_M = 128
#: The real predictors a per-block choice picks from (names yielded by ``predictors``).
PER_BLOCK_CANDIDATES = ("default", "both 32 + band 64", "mean of 8 + band 64")
#: Predictors selected per head (``head_budget_mask``) rather than per block.
PER_HEAD = ("colmax, per-head budget", "default adaptive, per-head budget")
#: (cheap, exact) predictors of the per-block budget bound (``budget_bound``).
BUDGET_PAIR = ("default adaptive", "colmax, estimated LSE")
#: Fractions of a head's blocks the budget bound gives the exact predictor.
BUDGET_FRACTIONS = (0.1, 0.25, 0.5, 0.75)


def column_stat(q, k, lse, rows, scale, reduce):
    """[B, H, QB, S]: per query block, the max or sum of exact probabilities over ``rows``."""
    blocks = math.ceil(q.shape[2] / SLICE_M)
    out = torch.zeros(q.shape[0], q.shape[1], blocks, k.shape[2], device=q.device)
    kf = k.float()
    for b in range(blocks):
        r = rows[(rows >= b * SLICE_M) & (rows < (b + 1) * SLICE_M)]
        p = torch.exp(torch.matmul(q[:, :, r].float(), kf.transpose(-1, -2)) * scale - lse[:, :, r].unsqueeze(-1))
        out[:, :, b] = p.amax(2) if reduce == "max" else p.sum(2)
    return out


def frame_bands(scores, colmax, frame: int, frames: int, band: int = 64):
    """``scores`` with the exact column max on each block's keys +-band shifted by 1..frames frames."""
    out = scores.clone()
    kv_len = scores.shape[-1]
    for b in range(scores.shape[2]):
        for shift in [j * frame for j in range(1, frames + 1)] + [-j * frame for j in range(1, frames + 1)]:
            lo, hi = max(0, b * SLICE_M + shift - band), min(kv_len, (b + 1) * SLICE_M + shift + band)
            if hi > lo:
                out[:, :, b, lo:hi] = colmax[:, :, b, lo:hi]
    return out


def block_errors(judge, mask) -> torch.Tensor:
    """[B, H, QB] squared output error of each query block against dense attention, float64."""
    out, _ = reference_attention(judge.q, judge.k, judge.v, mask, scale=judge.scale, rows_per_chunk=2048)
    err = ((out.double() - judge.dense.double()) ** 2).sum(-1)
    return torch.nn.functional.pad(err, (0, (-err.shape[-1]) % SLICE_M)).unflatten(-1, (-1, SLICE_M)).sum(-1)


def top_mask(scores, density: float, q_len: int) -> SliceMask:
    kv_len = scores.shape[-1]
    top = scores.topk(keys_for(density, kv_len), dim=-1).indices.sort(-1).values
    return SliceMask.from_topk(top.to(torch.int32), SLICE_M, q_len, kv_len)


def head_budget_mask(scores, density: float, q_len: int) -> SliceMask:
    """Per head, the blocks x keys_for(density) highest (block, key) scores: as many slices as a
    top-k of that density keeps, spread over the blocks as the scores say."""
    batch, heads, blocks, kv_len = scores.shape
    flat = scores.reshape(batch, heads, -1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.topk(blocks * keys_for(density, kv_len), -1).indices,
                                                             True)
    return SliceMask.from_dense(keep.reshape(scores.shape), SLICE_M, q_len)


def estimated_lses(q, k, scale):
    """{name: LSE} of the estimate (fgcupy.lse_estimate) and of each of its parts alone."""
    near, far = (part.view(q.shape[:3]) for part in lse_parts(q.flatten(0, 1), k.flatten(0, 1), SLICE_M,
                                                                ESTIMATE_BAND, scale))
    return {"colmax, estimated LSE": torch.logaddexp(near, far),
            "colmax, band LSE only": near, "colmax, far-sample LSE only": far}


def spread_scores(q, k, pool, scale):
    """[B, H, QB, S]: "mean of 32 + spread + band 64" of the module docstring, on sub-blocks of ``pool``."""
    batch, heads, q_len, dim = q.shape
    groups = math.ceil(q_len / pool)
    x = torch.nn.functional.pad(q.float(), (0, 0, 0, groups * pool - q_len)).view(batch, heads, groups, pool, dim)
    counts = torch.full((groups,), float(pool), device=q.device)
    counts[-1] = q_len - (groups - 1) * pool
    valid = (torch.arange(pool, device=q.device) < counts.unsqueeze(1)).view(1, 1, groups, pool, 1)
    mean = (x * valid).sum(3) / counts.view(1, 1, groups, 1)
    spread = (((x - mean.unsqueeze(3)) * valid) ** 2).sum((3, 4)) / counts.view(1, 1, groups) / dim
    kf = k.float()
    logits = scale * mean @ kf.transpose(-1, -2) + 0.5 * scale**2 * spread.unsqueeze(-1) * (kf * kf).sum(-1).unsqueeze(2)
    lse = torch.logsumexp(logits, -1)
    probs = torch.exp(logits - lse.unsqueeze(-1))
    per_block = SLICE_M // pool
    blocks = math.ceil(groups / per_block)
    probs = torch.nn.functional.pad(probs, (0, 0, 0, blocks * per_block - groups)).unflatten(2, (blocks, per_block))
    rows_lse = lse.repeat_interleave(pool, -1)[..., :q_len]
    return ref.refine_band(ref.stored_probs(probs.amax(3)), q, k, rows_lse, 1, SLICE_M, 64, scale)


def predictors(q, k, judge, scale, grid):
    """(name, a function computing its [B, H, QB, S] scores) of every predictor, in print order;
    scores that several share are computed once, and only if asked for."""
    rows = torch.arange(q.shape[2], device=q.device)
    lses = functools.cache(lambda: estimated_lses(q, k, scale))
    adaptive = functools.cache(lambda: ref.pooled_scores(q, k, 32, SLICE_M, 64, scale, "adaptive"))
    both = functools.cache(lambda: ref.pooled_scores(q, k, 64, SLICE_M, 64, scale, "both"))
    default = functools.cache(lambda: ref.pooled_scores(q, k, 32, SLICE_M, 64, scale, "mean"))

    def exact_on_top(frac):
        top = both().topk(keys_for(frac, k.shape[2]), -1).indices
        return both().scatter(-1, top, judge.colmax.gather(-1, top))

    for name in ("colmax, estimated LSE", "colmax, band LSE only", "colmax, far-sample LSE only"):
        yield name, functools.partial(lambda name: ref.colmax_scores(q, k, lses()[name], SLICE_M, scale), name)
    yield "colmax, per-head budget", lambda: judge.colmax
    yield "default adaptive", adaptive
    yield "default adaptive, per-head budget", adaptive
    yield "column sum", lambda: column_stat(q, k, judge.lse, rows, scale, "sum")
    yield "colmax dilated 1", lambda: ref.dilate_keys(judge.colmax, 1)
    yield "every 2nd query", lambda: column_stat(q, k, judge.lse, rows[::2], scale, "max")
    yield "every 8th query, dilated 4", lambda: ref.dilate_keys(column_stat(q, k, judge.lse, rows[4::8], scale, "max"), 4)
    yield "both 64 + band 64", both
    for frac in (0.1, 0.2):
        yield f"both, exact on top {frac}", functools.partial(exact_on_top, frac)
    yield "default", default
    yield "mean of 32 + spread + band 64", lambda: spread_scores(q, k, 32, scale)
    yield "both 32 + band 64", lambda: ref.pooled_scores(q, k, 32, SLICE_M, 64, scale, "both")
    for frames in sorted({min(2, grid[0] - 1), grid[0] - 1} - {0}):
        yield f"exact on frames +-{frames}", functools.partial(
            lambda frames: frame_bands(default(), judge.colmax, grid[1] * grid[2], frames), frames)
    for pool in (8, 4, 2):
        yield f"mean of {pool} + band 64", functools.partial(
            lambda pool: ref.pooled_scores(q, k, pool, SLICE_M, 64, scale, "mean"), pool)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="5x30x52")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["gauss-sharp", "mixture"], choices=list(FAMILIES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", help="judge only the predictors whose names start with one of these")
    args = parser.parse_args()
    grid = tuple(int(n) for n in args.grid.split("x"))
    shape = VideoShape(f"grid {args.grid}", 1, args.heads, 128, grid)
    scale = 1 / math.sqrt(shape.head_dim)
    print(f"grid {grid} ({shape.seq} tokens), {args.heads} heads per family, device {args.device}")
    for family in args.families:
        q, k, v = family_qkv(shape, family, heads=args.heads, device=args.device)
        judge = Judge(q, k, v, SLICE_M, scale)
        print(f"{family}: oracle error " + ", ".join(f"d={d}: {judge.oracle_error(d):.4f}" for d in (0.1, 0.3)))
        candidates = {}  # density -> [per-block errors of the real predictors]
        pair = {}  # (name, density) -> per-block errors of BUDGET_PAIR's predictors
        for name, compute in predictors(q, k, judge, scale, grid):
            if args.only and not name.startswith(tuple(args.only)):
                continue
            scores = compute()
            ratios = []
            for d in (0.1, 0.3):
                mask = (head_budget_mask if name in PER_HEAD else top_mask)(scores, d, q.shape[2])
                ratios.append(f"x{judge.ratio(mask)[1]:.2f}")
                if name in PER_BLOCK_CANDIDATES:
                    candidates.setdefault(d, []).append(block_errors(judge, mask))
                if name in BUDGET_PAIR:
                    pair[name, d] = block_errors(judge, mask)
            print(f"  {name:28s} d=0.1 {ratios[0]}  d=0.3 {ratios[1]}", flush=True)
        if len(pair) == 2 * len(BUDGET_PAIR):
            budget_bound(judge, pair, ref.block_coherence(q, SLICE_M))
        if len(candidates.get(0.1, ())) < len(PER_BLOCK_CANDIDATES):  # some left out by --only
            continue
        norm = float((judge.dense.double() ** 2).sum())
        bound = [math.sqrt(float(torch.stack(candidates[d]).amin(0).sum()) / norm) / judge.oracle_error(d)
                 for d in (0.1, 0.3)]
        print(f"  best per block of {', '.join(PER_BLOCK_CANDIDATES)}: d=0.1 x{bound[0]:.2f}  d=0.3 x{bound[1]:.2f}",
              flush=True)


def budget_bound(judge, pair, coherence):
    """Print "estimated column max on the best N of QB blocks" (module docstring) from the per-block
    errors ``pair`` {(name, density): [B, H, QB]} of BUDGET_PAIR."""
    norm = float((judge.dense.double() ** 2).sum())
    cheap, exact = BUDGET_PAIR
    blocks = coherence.shape[-1]
    for frac in BUDGET_FRACTIONS:
        count = min(blocks, max(1, round(frac * blocks)))
        cells = []
        for d in (0.1, 0.3):
            gain = pair[cheap, d] - pair[exact, d]
            for ranking in (gain, -coherence):
                chosen = torch.zeros_like(gain, dtype=torch.bool).scatter_(-1, ranking.topk(count, -1).indices, True)
                err = torch.where(chosen, pair[exact, d], pair[cheap, d]).sum()
                cells.append(f"x{math.sqrt(float(err) / norm) / judge.oracle_error(d):.2f}")
        print(f"  estimated column max on the best {count} of {blocks} blocks (least coherent): d=0.1 {cells[0]} "
              f"({cells[1]})  d=0.3 {cells[2]} ({cells[3]})", flush=True)


if __name__ == "__main__":
    main()

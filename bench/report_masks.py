"""Mask prediction on video-like attention: quality, cost and drift (one GPU, about 2-3 minutes).

    PYTHONPATH=. python -m bench.report_masks --json masks.json
    PYTHONPATH=. python -m bench.report_masks --device cpu --grid 9x30x52 --family-heads 4 \
        --densities 0.1 0.3 --skip quality timing drift     (the families section on a CPU;
    --skip families quality timing: the drift section)

0. Error against the oracle, per head family (fgcupy.head_families, --family-heads each; and
   the first heads of each fgcupy.workloads pattern, as "workload-<pattern>"): the oracle
   slice mask (exact column-max top-k; the yardstick, not the proven best) and the oracle
   128x128 block mask (the key blocks of most attention) at each density (its error / the oracle's at the block mask's own
   density, which whole key blocks round), and every predictor of JUDGED as its error / the
   oracle slice mask's error.
1. Quality, per workload pattern (fgcupy.workloads: spatial, temporal, mixed) at the preset's
   size: density vs relative L2 error (and cosine) of the attention output against dense float32
   attention (fgcupy.reference), for the cheap top-k and tau predictors, sub-block pooling (16
   queries, max and union), exact column-max, and a 128x128 block mask chosen from pooled
   block scores at the top-k densities. Errors are measured on a per-head subsample
   (--quality-heads, default every fifth head: all head styles of the mixed pattern); masks are
   exactly the ones the full problem would get for those heads.
2. Cost on the full problem (all heads, mixed pattern): predict_mask per method, and the
   scoring / selection stages of top-k, as CUDA-event medians beside SDPA (cuDNN, flash) in
   the same run, each read two ways (fgcupy.timing): an isolated call on an idle GPU (host
   launch work included) and GPU time with the call queued behind other work (as in a model,
   whose host runs ahead; host synchronisations still count).
3. Drift: q and k evolve slowly (--drift radians of content noise per step); the step-0 mask
   against a fresh one at later steps (fraction of kept slices that changed), the error of
   reusing the old mask vs predicting anew; for top-k, each against the oracle, with a sparse
   refresh (SparseAttentionConfig(sparse_refresh=True, local_search=False): the exact column max over the old and the
   new mask's keys with the LSE of attention through the old one) from the step-0 prediction and
   from the step-0 exact mask (mask_from_warmup), and a local search (local_search=True) that
   refreshes at every drift step listed, from the step-0 prediction (its candidates also hold
   the old mask's keys moved by a token, row or frame in turn); and the drift of q's and k's block means
   (fgcupy.cache.means_drift: what SparseAttentionConfig(refresh_on_drift=...) compares).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import torch

from bench.cases import sdpa_call
from bench.timing import cuda_time_ms
from fgcupy import SliceMask, find_diagonals, mask_drift, mask_kernels, predict_mask, scoring, sparse_attention
from fgcupy.local_search import refresh_topk, search_offsets, union_keys
from fgcupy.cache import block_means, means_drift
from fgcupy.calibration import calibrate_pooling
from fgcupy import mask_reference as ref
from fgcupy.head_families import FAMILIES, WORKLOAD_FAMILIES, family_or_workload_qkv, family_shape, mass_fraction
from fgcupy.oracle import Judge, exact_lse
from fgcupy.progress import progress_bar
from fgcupy.reference import dense_attention, reference_attention, relative_l2
from fgcupy.workloads import PATTERNS, SHAPES, video_qkv

#: One mean query per block and no exact band: the plain mean-query predictor.
MEAN = dict(pool=None, exact_band=None)


#: Marks predictors whose diagonals are found per problem (fgcupy.find_diagonals).
FOUND = "found"
#: Predictors judged against the oracle per head family (predict_mask keyword arguments; the
#: method is "topk" where none is named, the cheap scores alone with these options).
JUDGED = {
    # The cheap scores with their defaults: "auto"'s first mask.
    "topk": dict(),
    "mean (pool 128)": dict(pool=128, exact_band=None),
    "sampled 32 + band 64": dict(pool=32, pooling="sample", exact_band=64),
    "both 32 + band 64": dict(pool=32, pooling="both", exact_band=64),
    "adaptive 32 + band 64": dict(pool=32, pooling="adaptive", exact_band=64),
    "both 64 + band 64": dict(pool=64, pooling="both", exact_band=64),
    "pool 16": dict(pool=16, exact_band=None),
    "pool 32": dict(pool=32, exact_band=None),
    "pool 64 + band 128": dict(pool=64, exact_band=128),
    "pool 32 + band 64": dict(pool=32, exact_band=64),
    # The cheap scores with the band also moved along the diagonals sampled queries attend on.
    "topk + diagonals": dict(diagonals=FOUND),
    "pool 64 + band 64 + diagonals": dict(pool=64, exact_band=64, diagonals=FOUND),
    "pool 16 + band 128": dict(pool=16, exact_band=128),
    "pool 8 + band 128": dict(pool=8, exact_band=128),
    # The exact column max with each query's LSE estimated (fgcupy.lse_estimate): no dense step;
    # its products e4m3 where that kernel runs (fgcupy.e4m3), or the inputs' own.
    "colmax, estimated LSE": dict(method="colmax", lse="estimate"),
    "colmax, estimated LSE, inputs' products": dict(method="colmax", lse="estimate", products="input"),
    # predict_mask's default: "topk" where a check of sampled blocks finds it near their best
    # mask, else the above (per head; fgcupy.auto_mask).
    "auto": dict(method="auto"),
    # Per head, the pooling whose mask holds the most exact column-max mass (the LSE of a dense step).
    "calibrated (mean | both)": "calibrate",
    # The same choice without a dense step: the most probability of sampled queries
    # (fgcupy.calibration.DEFAULT_SAMPLES per block).
    "calibrated by samples (mean | both)": "calibrate_sampled",
}


def with_diagonals(kw, diagonals):
    """``kw`` with FOUND replaced by ``diagonals``."""
    return dict(kw, diagonals=diagonals) if isinstance(kw, dict) and kw.get("diagonals") == FOUND else kw


def block_mask(q, k, density, block=128):
    """A 128x128 block mask from pooled block scores: each query block keeps its best-scoring
    key blocks, round(density x key blocks) of them, as a SliceMask (slice_m = block)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qb, kb = ref.pool_queries(q, block), ref.pool_queries(k, block)
    scores = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    keep = max(1, min(kb.shape[2], round(density * kb.shape[2])))
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    dense = chosen.repeat_interleave(block, dim=-1)[..., : k.shape[2]]
    return SliceMask.from_dense(dense, block, q.shape[2])


class Quality:
    """Errors of masks against dense float32 attention on one (subsampled) problem."""

    def __init__(self, q, k, v):
        self.q, self.k, self.v = q, k, v
        self.dense = dense_attention(q, k, v)
        self.lse = exact_lse(q, k)

    def error(self, mask):
        out, _ = reference_attention(self.q, self.k, self.v, mask, rows_per_chunk=2048)
        cos = torch.nn.functional.cosine_similarity(out.flatten(2).double(), self.dense.flatten(2).double(), dim=-1)
        return relative_l2(out, self.dense), float(cos.mean())


def quality_rows(pattern, args, shape, heads, device):
    q, k, v = video_qkv(shape, pattern, head_ids=heads, seed=args.seed, device=device)
    qual = Quality(q, k, v)
    seq = shape.seq
    variants = [("topk", f"d={d}", dict(method="topk", density=d)) for d in args.densities]
    variants += [("tau", f"tau={t}", dict(method="tau", tau=t)) for t in args.taus]
    variants += [("topk-sub16-max", f"d={d}", dict(method="topk", density=d, pool=16, combine="max"))
                 for d in args.densities]
    variants += [("topk-sub16-union", f"k/8, d={d}", dict(method="topk", top_k=max(1, round(d * seq / 8)), pool=16,
                                                          combine="union")) for d in args.densities]
    variants += [("colmax", f"thr={c}/S", dict(method="colmax", threshold=c / seq, lse=qual.lse))
                 for c in args.colmax_scales]
    rows = []
    for method, param, kw in variants:
        rows.append(_measure(pattern, method, param, lambda kw=kw: predict_mask(q, k, 128, **kw), qual))
    for d in args.densities:
        rows.append(_measure(pattern, "block128", f"d={d}", lambda d=d: block_mask(q, k, d), qual))
    return rows


def _measure(pattern, method, param, make, qual):
    try:
        mask = make()
        err, cos = qual.error(mask)
        row = dict(pattern=pattern, method=method, param=param, density=mask.density(), rel_l2=err, cosine=cos)
        print(f"  {pattern:9s} {method:17s} {param:14s} density {row['density']:.4f}  rel L2 {err:.4f}  cos {cos:.5f}",
              flush=True)
    except Exception as err:  # noqa: BLE001 - report and go on with the other variants
        traceback.print_exc()
        row = dict(pattern=pattern, method=method, param=param, error=repr(err))
    return row


def family_rows(args, shape, device):
    """Every predictor's error / the oracle slice mask's error, per head family and density."""
    rows = []
    judged = {name: JUDGED[name] for name in args.judged}
    for family in progress_bar(args.families, desc="head families"):
        q, k, v = family_or_workload_qkv(shape, family, heads=args.family_heads, seed=args.seed, device=device)
        judge = Judge(q, k, v)
        diagonals = find_diagonals(q, k, 128)
        print(f"  {family:17s} diagonals found: {diagonals}", flush=True)
        coherence = ref.block_coherence(q, 128)
        # quantile, not torch.median: the latter is the lower of the two middle values
        base = dict(family=family, mass90=mass_fraction(q, k), coherence=float(coherence.flatten().double().quantile(0.5)))
        print(f"  {family:17s} keys holding 90% of a query's mass: {100 * base['mass90']:.2f}%  "
              f"median block coherence {base['coherence']:.3f}", flush=True)
        for d in args.densities:
            oracle = judge.oracle_error(d)
            block_mask = judge.block_oracle(d)  # whole key blocks: its density is d rounded to blocks
            block, block_ratio = judge.ratio(block_mask)
            line = f"    d={d:<5} oracle {oracle:.4f}  block128 x{block_ratio:.2f} (at d={block_mask.density():.3f})"
            row = dict(base, density=d, oracle_rel_l2=oracle, block_rel_l2=block, block_ratio=block_ratio,
                       block_density=block_mask.density(), ratios={})
            for name, kw in judged.items():
                try:
                    if kw in ("calibrate", "calibrate_sampled"):
                        lse = judge.lse if kw == "calibrate" else None
                        kw = dict(pooling=calibrate_pooling(q, k, lse, 128, density=d))
                    kw = dict(with_diagonals(kw, diagonals))
                    err, ratio = judge.ratio(predict_mask(q, k, 128, kw.pop("method", "topk"), density=d, **kw))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    traceback.print_exc()
                    row["ratios"][name] = repr(exc)
                    continue
                row["ratios"][name] = ratio
                line += f"  {name} x{ratio:.2f}"
            print(line, flush=True)
            rows.append(row)
        del q, k, v, judge
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def timing_rows(args, shape, device):
    q, k, v = video_qkv(shape, "mixed", seed=args.seed, device=device)
    scale = 1.0 / math.sqrt(shape.head_dim)
    rows = []

    def record(what, fn, **extra):
        try:
            ms = cuda_time_ms(fn, warmup=2, reps=args.reps)
            gpu = cuda_time_ms(fn, warmup=1, reps=args.reps, queued=True)
            rows.append(dict(what=what, ms=ms["median_ms"], min_ms=ms["min_ms"], gpu_ms=gpu["median_ms"],
                             gpu_min_ms=gpu["min_ms"], **extra))
            print(f"  {what:44s} {ms['median_ms']:9.3f} ms (min {ms['min_ms']:.3f}), queued {gpu['median_ms']:9.3f} ms "
                  f"(min {gpu['min_ms']:.3f})", flush=True)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            rows.append(dict(what=what, error=repr(err)))

    for backend in ("cudnn", "flash"):
        record(f"sdpa-{backend} dense", sdpa_call(q, k, v, backend))
    lse = exact_lse(q, k, scale)
    diagonals = find_diagonals(q, k, 128)
    record(f"find_diagonals (found {diagonals})", lambda: find_diagonals(q, k, 128))
    for label, kw in (
        ("predict topk d=0.1 mean query", dict(MEAN, method="topk", density=0.1)),
        ("predict topk d=0.1 float32 logits", dict(MEAN, method="topk", density=0.1, logits_dtype=torch.float32)),
        ("predict topk d=0.1 local=128", dict(MEAN, method="topk", density=0.1, local=128)),
        ("predict threshold p>=1e-4", dict(MEAN, method="threshold", threshold=1e-4)),
        ("predict threshold p>=1e-4 float32 logits", dict(MEAN, method="threshold", threshold=1e-4,
                                                          logits_dtype=torch.float32)),
        ("predict threshold p>=1e-4 max_keys=S/2 (no sync)", dict(MEAN, method="threshold", threshold=1e-4,
                                                                  max_keys=shape.seq // 2)),
        ("predict tau=0.9 (one host sync)", dict(MEAN, method="tau", tau=0.9)),
        ("predict tau=0.9 float16 logits", dict(MEAN, method="tau", tau=0.9, logits_dtype=torch.float16)),
        ("predict tau=0.9 max_keys=S/2 (no sync)", dict(MEAN, method="tau", tau=0.9, max_keys=shape.seq // 2)),
        ("predict topk d=0.1 sub16 max", dict(MEAN, method="topk", density=0.1, pool=16, combine="max")),
        ("predict topk sub16 union", dict(MEAN, method="topk", top_k=round(0.1 * shape.seq / 8), pool=16, combine="union")),
        ("predict colmax thr=0.5/S", dict(method="colmax", lse=lse)),
        *((f"predict {kw.get('method', 'topk')} d={d} {name}",
           {"method": "topk", **with_diagonals(kw, diagonals), "density": d})
          for d in args.densities for name, kw in JUDGED.items() if name in args.judged and isinstance(kw, dict)),
    ):
        record(label, lambda kw=kw: predict_mask(q, k, 128, **kw))
    for density in (0.1, 0.3):
        # sparse_refresh's second half: the old mask (here the exact one of this step) and the
        # cheap top-k's keys scored exactly with the LSE of attention through the old mask.
        old = predict_mask(q, k, 128, "colmax", rule="topk", density=density, lse=lse)
        candidates = [old, predict_mask(q, k, 128, "topk", density=density)]
        sparse_lse = sparse_attention(q, k, v, old, return_lse=True)[1]
        record(f"colmax over candidates d={density} (old + top-k masks)",
               lambda d=density, c=candidates, s=sparse_lse: predict_mask(q, k, 128, "colmax", rule="topk", density=d,
                                                                        lse=s, candidates=c),
               candidate_density=float(sum(m.density() for m in candidates)))
        del old, candidates, sparse_lse
    # Stages of mean-query selection: pooling (torch), scoring kernel, selection and emit
    # kernels; float16 logits are top-k's and threshold's default, float32 tau's.
    req = scoring.make_request(shape.head_dim, shape.seq, 128, "topk", density=0.1)
    pooled = ref.pool_queries(q, 128).to(q.dtype).contiguous()
    record("  stage: pool queries (torch)", lambda: ref.pool_queries(q, 128).to(q.dtype))
    for mode, warps in (("logits", 4), ("logits", 8), ("logits_f16", 8)):
        record(f"  stage: score kernel ({mode} + lse, {warps} warps)",
               lambda m=mode, w=warps: mask_kernels.gpu_scores(m, pooled, k, req.scale, warps=w))
    half, half_lse = mask_kernels.gpu_scores("logits_f16", pooled, k, req.scale, warps=8)
    vals, row_lse = mask_kernels.gpu_scores("logits", pooled, k, req.scale, warps=8)
    per_row = req.top_k
    offsets = (torch.arange(vals.shape[0] * vals.shape[1], device=device, dtype=torch.int64) * per_row).to(torch.int32)
    out = torch.empty(vals.shape[0] * vals.shape[1] * per_row, dtype=torch.int32, device=device)
    record("  stage: select kernel (float16 logits, top-k, fused emit)",
           lambda: mask_kernels.gpu_select(half, shape.seq, req, lse=half_lse, offsets=offsets, out=out))
    record("  stage: select kernel (float32 logits, top-k, fused emit)",
           lambda: mask_kernels.gpu_select(vals, shape.seq, req, lse=row_lse, offsets=offsets, out=out))
    def select_then_emit(what, scores, score_lse, sel_req):
        """Time a selection into counts and bitmasks, then the emit of those bitmasks."""
        record(f"  stage: select kernel ({what}, counts and bitmask)",
               lambda: mask_kernels.gpu_select(scores, shape.seq, sel_req, lse=score_lse, bits=True))
        counts, bits = mask_kernels.gpu_select(scores, shape.seq, sel_req, lse=score_lse, bits=True)
        starts = (torch.cumsum(counts, 0) - counts).to(torch.int32)
        kept = torch.empty(int(counts.sum()), dtype=torch.int32, device=device)
        record(f"  stage: emit kernel ({what.split(', ')[-1]} bitmask to indices)",
               lambda: mask_kernels.gpu_emit(bits, shape.seq, scores.shape[1], 1, 128, counts, offsets=starts,
                                             out=kept))

    select_then_emit("float32 logits, tau=0.9", vals, row_lse,
                     scoring.make_request(shape.head_dim, shape.seq, 128, "tau", tau=0.9))
    select_then_emit("float16 logits, threshold 1e-4", half, half_lse,
                     scoring.make_request(shape.head_dim, shape.seq, 128, "threshold", threshold=1e-4))
    dense = next((r for r in rows if r["what"] == "sdpa-cudnn dense" and "ms" in r), None)
    for r in rows:
        if dense and "ms" in r:
            r["pct_of_sdpa_cudnn"] = 100.0 * r["ms"] / dense["ms"]
            r["gpu_pct_of_sdpa_cudnn"] = 100.0 * r["gpu_ms"] / dense["gpu_ms"]
    return rows


def sparse_refresh_errors(q, k, v, qual, density: float, fresh, predicted0, exact0) -> dict:
    """Top-k at ``density`` on one drifted step: the errors of the oracle mask, and of what
    SparseAttentionConfig(sparse_refresh=True) makes from an old mask (the step-0 prediction
    ``predicted0``, or the step-0 exact mask ``exact0`` as mask_from_warmup gives): the LSE of
    attention through it, the exact column max over its keys and the ``fresh`` prediction's."""
    def refreshed(old):
        return refresh_topk(q, k, v, old, union_keys(old, (0,), fresh), density)

    oracle = predict_mask(q, k, 128, "colmax", rule="topk", density=density, lse=qual.lse)
    return dict(rel_l2_oracle=qual.error(oracle)[0], rel_l2_sparse_refresh=qual.error(refreshed(predicted0))[0],
                rel_l2_exact0_reused=qual.error(exact0)[0], rel_l2_exact0_sparse_refresh=qual.error(refreshed(exact0))[0])


def local_search_refresh(q, k, v, old, fresh, density: float, grid, refresh: int):
    """What SparseAttentionConfig(sparse_refresh=True, local_search=True) makes from ``old`` on
    its ``refresh``-th refresh: the exact column max over old's keys, their moved copies and the
    ``fresh`` prediction's."""
    return refresh_topk(q, k, v, old, union_keys(old, search_offsets(grid, refresh), fresh), density)


def drift_rows(args, shape, heads, device):
    rows = []
    methods = (("topk d=0.1", dict(method="topk", density=0.1)), ("tau=0.9", dict(method="tau", tau=0.9)))
    first, exact0, means0, searched = {}, None, None, None
    for step in [0] + args.drift_steps:
        q, k, v = video_qkv(shape, "mixed", head_ids=heads, seed=args.seed, device=device, step=step, drift=args.drift)
        qual = Quality(q, k, v)
        means = block_means(q, 128), block_means(k, 128)
        means0 = means if step == 0 else means0
        signal = max(float(means_drift(a, b)) for a, b in zip(means0, means))  # what refresh_on_drift reads
        for label, kw in methods:
            fresh = predict_mask(q, k, 128, **kw)
            if step == 0:
                first[label] = fresh
                if kw["method"] == "topk":
                    exact0 = predict_mask(q, k, 128, "colmax", rule="topk", density=kw["density"], lse=qual.lse)
                continue
            moved = mask_drift(first[label], fresh)
            err_fresh, _ = qual.error(fresh)
            err_reused, _ = qual.error(first[label])
            row = dict(step=step, method=label, changed=moved["changed"], jaccard=moved["jaccard"],
                       rel_l2_fresh=err_fresh, rel_l2_reused=err_reused, means_drift=signal)
            line = (f"  step {step:3d} {label:10s} changed {moved['changed']:.4f} jaccard {moved['jaccard']:.4f}  "
                    f"rel L2 fresh {err_fresh:.4f} reused {err_reused:.4f}")
            if kw["method"] == "topk":  # the same density for every mask
                row.update(sparse_refresh_errors(q, k, v, qual, kw["density"], fresh, first[label], exact0))
                searched = local_search_refresh(q, k, v, searched or first[label], fresh, kw["density"], shape.grid,
                                                args.drift_steps.index(step))
                row["rel_l2_local_search"] = qual.error(searched)[0]
                oracle = row["rel_l2_oracle"]
                line += (f" | / oracle {oracle:.4f}: fresh x{err_fresh / oracle:.2f}, reused x{err_reused / oracle:.2f}, "
                         f"sparse refresh x{row['rel_l2_sparse_refresh'] / oracle:.2f}; step-0 exact mask reused "
                         f"x{row['rel_l2_exact0_reused'] / oracle:.2f}, its sparse refresh "
                         f"x{row['rel_l2_exact0_sparse_refresh'] / oracle:.2f}; local search from the step-0 "
                         f"prediction, a refresh each step listed, x{row['rel_l2_local_search'] / oracle:.2f} |")
            rows.append(row)
            print(f"{line}  block-means drift {signal:.2e}", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-480p", choices=sorted(SHAPES))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    parser.add_argument("--quality-heads", type=int, nargs="+", default=None,
                        help="head ids for the quality and drift sections (default: every fifth head)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                        help="densities of the families section and of the timed predictors")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    parser.add_argument("--colmax-scales", type=float, nargs="+", default=[0.5, 4.0, 32.0],
                        help="column-max thresholds, in units of 1/S")
    parser.add_argument("--drift", type=float, default=0.02, help="radians of content-noise rotation per step")
    parser.add_argument("--drift-steps", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES) + WORKLOAD_FAMILIES,
                        choices=list(FAMILIES) + WORKLOAD_FAMILIES)
    parser.add_argument("--family-heads", type=int, default=8, help="heads per family")
    parser.add_argument("--judged", nargs="+", default=list(JUDGED), choices=list(JUDGED),
                        help="predictors of the families and timing sections")
    parser.add_argument("--grid", help="T x H x W latent grid replacing the preset's (e.g. 9x30x52)")
    parser.add_argument("--device", default="cuda",
                        help="cuda, or cpu for the families and drift sections (torch reference; hours at full size)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["families", "quality", "timing", "drift"])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape = SHAPES[args.preset]
    if args.grid:
        shape = family_shape(shape, tuple(int(n) for n in args.grid.lower().split("x")))
    if device.type != "cuda" and not {"quality", "timing"} <= set(args.skip):
        parser.error("off the GPU only the families and drift sections run: --skip quality timing")
    heads = args.quality_heads if args.quality_heads is not None else list(range(0, shape.heads, 5))
    header = (f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} | torch {torch.__version__} | preset {shape.name} "
              f"(B={shape.batch}, H={shape.heads}, S={shape.seq}, D={shape.head_dim}, grid {shape.grid}) | "
              f"quality heads {heads}")
    print(header, flush=True)
    result = dict(header=header, args=vars(args), families=[], quality=[], timing=[], drift=[])
    started = time.perf_counter()
    if "families" not in args.skip:
        print("\n## error / oracle error per head family (fgcupy.head_families, top-k at each density)", flush=True)
        result["families"] = family_rows(args, shape, device)
        print(f"  [{time.perf_counter() - started:.0f} s]", flush=True)
    if "quality" not in args.skip:
        print("\n## density vs relative L2 error (per pattern)", flush=True)
        for pattern in args.patterns:
            result["quality"] += quality_rows(pattern, args, shape, heads, device)
            torch.cuda.empty_cache()
        print(f"  [{time.perf_counter() - started:.0f} s]", flush=True)
    if "timing" not in args.skip:
        print(f"\n## cost on the full problem (CUDA-event medians of {args.reps})", flush=True)
        result["timing"] = timing_rows(args, shape, device)
        torch.cuda.empty_cache()
        print(f"  [{time.perf_counter() - started:.0f} s]", flush=True)
    if "drift" not in args.skip:
        print(f"\n## drift between refresh steps (mixed pattern, {args.drift} rad/step)", flush=True)
        result["drift"] = drift_rows(args, shape, heads, device)
        print(f"  [{time.perf_counter() - started:.0f} s]", flush=True)

    _print_summary(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    failures = [r for section in ("quality", "timing", "drift") for r in result[section] if "error" in r]
    failures += [r for r in result["families"] if any(isinstance(x, str) for x in r["ratios"].values())]
    if failures:
        print(f"\n{len(failures)} measurements failed: {[r.get('what') or r.get('method') for r in failures]}")
        raise SystemExit(1)


def _print_summary(result):
    families = result["families"]
    if families:
        names = list(families[0]["ratios"])
        print("\n| family | density | oracle rel L2 | block128 | " + " | ".join(names) + " |")
        print("|---|---|---|---|" + "---|" * len(names))
        for r in families:
            cells = [f"x{r['ratios'][n]:.2f}" if isinstance(r["ratios"].get(n), float) else "-" for n in names]
            block = r.get("block_ratio", r["block_rel_l2"] / r["oracle_rel_l2"])  # files from before block_ratio
            print(f"| {r['family']} | {r['density']} | {r['oracle_rel_l2']:.4f} | x{block:.2f} | "
                  + " | ".join(cells) + " |")
        print("\nworst ratio over families at each density:")
        for d in dict.fromkeys(r["density"] for r in families):
            worst = {n: max((r["ratios"][n] for r in families if r["density"] == d and isinstance(r["ratios"].get(n), float)),
                            default=float("nan")) for n in names}
            print(f"  d={d}: " + "  ".join(f"{n} x{w:.2f}" for n, w in worst.items()))
    quality = [r for r in result["quality"] if "error" not in r]
    if quality:
        print("\n| pattern | method | parameter | density | rel L2 | cosine |\n|---|---|---|---|---|---|")
        for r in quality:
            print(f"| {r['pattern']} | {r['method']} | {r['param']} | {r['density']:.4f} | {r['rel_l2']:.4f} | {r['cosine']:.5f} |")
        print("\nslice vs block at equal density (top-k rows):")
        for pattern in dict.fromkeys(r["pattern"] for r in quality):
            slices = {r["param"]: r for r in quality if r["pattern"] == pattern and r["method"] == "topk"}
            blocks = {r["param"]: r for r in quality if r["pattern"] == pattern and r["method"] == "block128"}
            for param in slices.keys() & blocks.keys():
                s, b = slices[param], blocks[param]
                ratio = b["rel_l2"] / s["rel_l2"] if s["rel_l2"] > 0 else float("inf")
                print(f"  {pattern:9s} {param:8s} slice {s['rel_l2']:.4f} (d {s['density']:.3f})  block {b['rel_l2']:.4f} "
                      f"(d {b['density']:.3f})  block/slice error x{ratio:.2f}")
    timing = [r for r in result["timing"] if "ms" in r]
    if timing:
        print("\n| what | isolated call ms | % of SDPA cuDNN | queued (GPU) ms | % of SDPA cuDNN |\n|---|---|---|---|---|")
        for r in timing:
            pct = f"{r['pct_of_sdpa_cudnn']:.1f}" if "pct_of_sdpa_cudnn" in r else "-"
            gpu_pct = f"{r['gpu_pct_of_sdpa_cudnn']:.1f}" if "gpu_pct_of_sdpa_cudnn" in r else "-"
            print(f"| {r['what'].strip()} | {r['ms']:.3f} | {pct} | {r['gpu_ms']:.3f} | {gpu_pct} |")


if __name__ == "__main__":
    main()

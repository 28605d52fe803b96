"""How good a refresh from a sparse step could be, per head family (a quality probe; CPU or GPU).

    PYTHONPATH=. python -m tools.probe_sparse_refresh [--drift 0.3] [--families mixture ...]
        [--grid 5x30x52] [--heads 2] [--densities 0.1 0.3] [--device cpu]

Step A is a head family's q, k, v and its oracle mask M0 (the exact column-max top-k: what a
dense warm-up step gives, SparseAttentionConfig(mask_from_warmup=True)). At step B, q and k have
drifted (fresh content noise of std ``--drift`` added to every entry; v kept). A refresh at step
B could score exactly the keys M0 keeps plus the default predictor's keys: max over each block's
queries of logit - lse, where lse is each query's LSE over M0's keys (what step B's sparse
attention through M0 returns), and keep the top-k. Printed, as error / step B's oracle error:
the default predictor at step B, M0 reused, and that refresh.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import torch

from fgcupy import SliceMask, predict_mask
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.mask import num_blocks
from fgcupy.oracle import Judge, keys_for
from fgcupy.workloads import SHAPES


def drifted(t: torch.Tensor, drift: float, gen: torch.Generator) -> torch.Tensor:
    return (t.float() + drift * torch.randn(t.shape, generator=gen).to(t.device)).to(t.dtype)


def sparse_refresh(q, k, previous: torch.Tensor, candidates: torch.Tensor, keys: int, slice_m: int,
                   scale: float) -> SliceMask:
    """The top ``keys`` of each block among ``previous | candidates`` (bool [B, H, QB, S]) by the
    exact column max of logit - lse, lse over ``previous``'s keys of each query's block."""
    q_len = q.shape[2]
    q_blocks = num_blocks(q_len, slice_m)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    kept_rows = previous.repeat_interleave(slice_m, dim=2)[:, :, :q_len]
    lse = torch.logsumexp(logits.masked_fill(~kept_rows, -math.inf), -1, keepdim=True)
    pad = q_blocks * slice_m - q_len
    scores = torch.nn.functional.pad(logits - lse, (0, 0, 0, pad), value=-math.inf)
    scores = scores.unflatten(2, (q_blocks, slice_m)).amax(3).masked_fill(~(previous | candidates), -math.inf)
    top = scores.topk(keys, dim=-1).indices.sort(-1).values
    return SliceMask.from_topk(top.to(torch.int32), slice_m, q_len, k.shape[2])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drift", type=float, default=0.3, help="std of the content noise added at step B")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--grid", default="5x30x52", help="frames x height x width of the token grid")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    grid = tuple(int(x) for x in args.grid.split("x"))
    shape = replace(SHAPES["wan14b-480p"], grid=grid, heads=args.heads)
    slice_m = 128
    print(f"grid {grid}, {args.heads} heads per family, drift {args.drift}, device {args.device}", flush=True)
    for family in args.families:
        q0, k0, v = family_qkv(shape, family, heads=args.heads, seed=args.seed, device=args.device)
        gen = torch.Generator().manual_seed(args.seed + 7)
        q1, k1 = drifted(q0, args.drift, gen), drifted(k0, args.drift, gen)
        before, after = Judge(q0, k0, v, slice_m), Judge(q1, k1, v, slice_m)
        for density in args.densities:
            previous = before.oracle(density)
            default = predict_mask(q1, k1, slice_m, "topk", density=density)
            refreshed = sparse_refresh(q1, k1, previous.to_dense(), default.to_dense(), keys_for(density, k1.shape[2]),
                                       slice_m, after.scale)
            print(f"{family:17s} d={density}: default x{after.ratio(default)[1]:.2f}  "
                  f"M0 reused x{after.ratio(previous)[1]:.2f}  "
                  f"exact over M0 + default keys x{after.ratio(refreshed)[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""How good a refresh from a sparse step could be, per head family (a quality probe; CPU or GPU).

    PYTHONPATH=. python -m tools.probe_sparse_refresh [--drift 0.3] [--families mixture ...]
        [--grid 5x30x52] [--heads 2] [--densities 0.1 0.3] [--device cpu]

Step A is a head family's q, k, v and its oracle mask M0 (the exact column-max top-k: what a
dense warm-up step gives, SparseAttentionConfig(mask_from_warmup=True)). At step B, q and k have
drifted (fresh content noise of std ``--drift`` added to every entry; v kept). A refresh at step
B could score exactly the keys M0 keeps plus the default predictor's keys: max over each block's
queries of logit - lse, where lse is each query's LSE over M0's keys (what step B's sparse
attention through M0 returns), and keep the top-k: SparseAttentionConfig(sparse_refresh=True),
through the library's path (the kernels on a GPU, the reference on a CPU). Printed, as error / step B's oracle error:
the default predictor at step B, M0 reused, and that refresh.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from fgcupy import SliceMask, predict_mask, sparse_attention
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.oracle import Judge
from fgcupy.workloads import SHAPES


def drifted(t: torch.Tensor, drift: float, gen: torch.Generator) -> torch.Tensor:
    return (t.float() + drift * torch.randn(t.shape, generator=gen).to(t.device)).to(t.dtype)


def sparse_refresh(q, k, v, previous: SliceMask, density: float) -> SliceMask:
    """What SparseAttentionConfig(sparse_refresh=True) makes at step B: attention through
    ``previous`` for each query's LSE over its keys, then the exact column-max top-k over the keys
    of ``previous`` and of the default predictor."""
    _, lse = sparse_attention(q, k, v, previous, return_lse=True)
    default = predict_mask(q, k, previous.slice_m, "topk", density=density)
    return predict_mask(q, k, previous.slice_m, "colmax", rule="topk", density=density, lse=lse,
                        candidates=[previous, default])


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
            refreshed = sparse_refresh(q1, k1, v, previous, density)
            print(f"{family:17s} d={density}: default x{after.ratio(default)[1]:.2f}  "
                  f"M0 reused x{after.ratio(previous)[1]:.2f}  "
                  f"exact over M0 + default keys x{after.ratio(refreshed)[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()

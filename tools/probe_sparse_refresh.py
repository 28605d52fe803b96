"""How good a refresh from a sparse step could be, per head family (a quality probe; CPU or GPU).

    PYTHONPATH=. python -m tools.probe_sparse_refresh [--drift 0.3] [--families mixture ...]
        [--grid 5x30x52] [--heads 2] [--densities 0.1 0.3] [--device cpu] [--iterate N]

Step A is a head family's q, k, v and its oracle mask M0 (the exact column-max top-k: what a
dense warm-up step gives, SparseAttentionConfig(mask_from_warmup=True)). At step B, q and k have
drifted (fresh content noise of std ``--drift`` added to every entry; v kept). A refresh at step
B could score exactly the keys M0 keeps plus the cheap top-k predictor's keys: max over each block's
queries of logit - lse, where lse is each query's LSE over M0's keys (what step B's sparse
attention through M0 returns), and keep the top-k: SparseAttentionConfig(sparse_refresh=True, local_search=False),
through the library's path (the kernels on a GPU, the reference on a CPU). Printed, as error / step B's oracle error:
the cheap top-k predictor at step B, M0 reused, and that refresh. With ``--iterate N``: N refreshes in
a row from the default's own mask (q and k drifting before each), without and with the old mask's
keys moved by one token, row or frame of the grid as candidates too (a local search).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from fgcupy import SliceMask, predict_mask
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.local_search import grid_offsets, refresh_topk, search_offsets, union_keys
from fgcupy.oracle import Judge
from fgcupy.workloads import SHAPES


def drifted(t: torch.Tensor, drift: float, gen: torch.Generator) -> torch.Tensor:
    return (t.float() + drift * torch.randn(t.shape, generator=gen).to(t.device)).to(t.dtype)


def sparse_refresh(q, k, v, previous: SliceMask, density: float) -> SliceMask:
    """What SparseAttentionConfig(sparse_refresh=True) makes at step B: the exact column-max top-k
    over the keys of ``previous`` and of the cheap top-k predictor."""
    default = predict_mask(q, k, previous.slice_m, "topk", density=density)
    return refresh_topk(q, k, v, previous, union_keys(previous, (0,), default), density)


SEARCHES = ("plain", "rotating", "all", "all, no predictor", "rotating, no predictor")


def local_search(args, shape, grid) -> None:
    """--iterate: from the cheap top-k's mask (or the oracle's, ``--start oracle``), ``args.iterate``
    refreshes, each on q, k drifted again, side by side: a plain sparse refresh; one that also
    scores the old mask's keys moved by one token, row or frame of the grid either way (one of the
    three in turn); one that moves them by all three; those two without the predictor's keys."""
    every = (0, *(sign * o for o in grid_offsets(grid) for sign in (1, -1)))
    variants = {
        "plain": lambda step: ((0,), True),
        "rotating": lambda step: (search_offsets(grid, step), True),
        "all": lambda step: (every, True),
        "all, no predictor": lambda step: (every, False),
        "rotating, no predictor": lambda step: (search_offsets(grid, step), False),
    }
    variants = {name: variants[name] for name in args.variants}
    print("columns per refresh: default / " + " / ".join(variants) + "  (error / oracle error); "
          "candidates: the union's density / the mask's", flush=True)
    for family in args.families:
        q, k, v = family_qkv(shape, family, heads=args.heads, seed=args.seed, device=args.device)
        gen = torch.Generator().manual_seed(args.seed + 7)
        for density in args.densities:
            start = (Judge(q, k, v, 128).oracle(density) if args.start == "oracle"
                     else predict_mask(q, k, 128, "topk", density=density))
            masks = dict.fromkeys(variants, start)
            line, scored = f"{family:17s} d={density}:", {name: [] for name in variants}
            for step in range(args.iterate):
                q, k = drifted(q, args.drift, gen), drifted(k, args.drift, gen)
                judge = Judge(q, k, v, 128)
                default = predict_mask(q, k, 128, "topk", density=density)
                cells = [f"{judge.ratio(default)[1]:.2f}"]
                for name, choose in variants.items():
                    moves, with_predictor = choose(step)
                    union = union_keys(masks[name], moves, default if with_predictor else None)
                    scored[name].append(union.density() / density)
                    masks[name] = refresh_topk(q, k, v, masks[name], union, density)
                    cells.append(f"{judge.ratio(masks[name])[1]:.2f}")
                line += "  " + "/".join(cells)
            costs = " / ".join(f"{sum(c) / len(c):.2f}" for c in scored.values())
            print(f"{line}  (candidates {costs})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drift", type=float, default=0.3, help="std of the content noise added at step B")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--grid", default="5x30x52", help="frames x height x width of the token grid")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", choices=("default", "oracle"), default="default",
                        help="--iterate's first mask: the cheap top-k predictor's or the oracle's (a dense warm-up)")
    parser.add_argument("--variants", nargs="+", default=list(SEARCHES), choices=SEARCHES,
                        help="--iterate's refreshes to run side by side")
    parser.add_argument("--iterate", type=int, default=0,
                        help="refreshes in a row from the cheap top-k's mask, q and k drifting before each (0: one "
                             "refresh from the oracle mask)")
    args = parser.parse_args(argv)
    grid = tuple(int(x) for x in args.grid.split("x"))
    shape = replace(SHAPES["wan14b-480p"], grid=grid, heads=args.heads)
    slice_m = 128
    print(f"grid {grid}, {args.heads} heads per family, drift {args.drift}, device {args.device}", flush=True)
    if args.iterate:
        local_search(args, shape, grid)
        return
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

"""Whether the column max survives q and k rounded to float8 e4m3 (a lead for a Hopper
column-max pass at twice the bfloat16 tensor rate): per head family, the oracle ratio of the
estimated column max's top-k mask (``lse="estimate"``) from bfloat16 q and k and from the same
q and k rounded to e4m3 (one power-of-two scale per tensor, its largest value at most 448), on
the CPU reference.

    PYTHONPATH=. python -m tools.probe_fp8_colmax [--grid 5x30x52] [--heads 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import math

import torch

from fgcupy import SliceMask
from fgcupy.e4m3 import E4M3_MAX
from fgcupy.head_families import FAMILIES, family_qkv, family_shape
from fgcupy.lse_estimate import estimate_lse
from fgcupy.mask_reference import colmax_scores
from fgcupy.oracle import Judge, keys_for
from fgcupy.workloads import PATTERNS, SHAPES, video_qkv


def e4m3_rounded(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` as e4m3 holds it, under one power-of-two scale that keeps |x| <= 448."""
    amax = float(x.float().abs().max())
    scale = 2.0 ** math.floor(math.log2(E4M3_MAX / amax)) if amax > 0 else 1.0
    return (x.float() * scale).to(torch.float8_e4m3fn).float() / scale


def topk_mask(scores: torch.Tensor, q_len: int, kv_len: int, density: float) -> SliceMask:
    top = scores.topk(keys_for(density, kv_len), dim=-1).indices.sort(-1).values
    return SliceMask.from_topk(top.to(torch.int32), 128, q_len, kv_len)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="5x30x52", help="T x H x W latent grid")
    parser.add_argument("--heads", type=int, default=2, help="heads per family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args(argv)
    shape = family_shape(SHAPES["wan14b-480p"], tuple(int(n) for n in args.grid.lower().split("x")))
    print(f"CPU | grid {shape.grid} | {args.heads} heads per family | seed {args.seed}")
    print("| family | d | bfloat16 q, k | e4m3 q, k |")
    print("|---|---|---|---|")
    families = list(FAMILIES) + [f"workload-{p}" for p in PATTERNS]
    for family in families:
        if family.startswith("workload-"):
            q, k, v = video_qkv(shape, family[len("workload-"):], head_ids=range(args.heads), seed=args.seed)
        else:
            q, k, v = family_qkv(shape, family, heads=args.heads, seed=args.seed)
        judge = Judge(q, k, v)
        lse = estimate_lse(q, k, 128)
        exact_inputs = colmax_scores(q, k, lse, 128, judge.scale)
        rounded_inputs = colmax_scores(e4m3_rounded(q), e4m3_rounded(k), lse, 128, judge.scale)
        for d in args.densities:
            ratios = [judge.ratio(topk_mask(s, q.shape[2], k.shape[2], d))[1] for s in (exact_inputs, rounded_inputs)]
            print(f"| {family} | {d} | x{ratios[0]:.2f} | x{ratios[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

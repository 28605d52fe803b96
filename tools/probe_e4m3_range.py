"""How far the e4m3 column max holds on heads whose elements span a wide range: i.i.d. heads
whose first few channels of q are R times the rest and of k R times smaller (the same logits,
so the same oracle), for R from 1 to 10,000. Each head is scaled by the largest power of two
that keeps its rows' sums of squares within fgcupy.e4m3.E4M3_ROW_SUMSQ before rounding, so the
wide channels take most of each row's norm and the rest sit about R times lower, where e4m3
keeps fewer bits below 2^-6. Prints the oracle ratio of the column max's top-k mask (exact and
estimated LSE) on the inputs' products and on e4m3 products.

    PYTHONPATH=. python -m tools.probe_e4m3_range [--seq 4096] [--heads 2] [--device cpu]

``--device cuda`` runs the kernels on bfloat16 copies of the inputs (on a Hopper GPU the
conversion kernels and the e4m3 pass); the CPU runs the float32 reference.
"""

from __future__ import annotations

import argparse

import torch

from fgcupy import predict_mask
from fgcupy.e4m3 import E4M3_ROW_SUMSQ
from fgcupy.oracle import Judge
from tools.probe_foreign_inputs import inputs, run_on

DIM = 128
SLICE_M = 128
WIDE_CHANNELS = 4


def heads(logit_std: float, n_heads: int, seq: int, seed: int) -> tuple:
    """(q, k, v) float32 [1, n_heads, seq, DIM]: i.i.d. logits of standard deviation ``logit_std``
    (tools.probe_foreign_inputs' heads), v standard normal."""
    gen = torch.Generator().manual_seed(seed)
    q, k = inputs(f"i.i.d. std {logit_std:g}", n_heads, seq, gen, DIM)
    return q, k, torch.randn(q.shape, generator=gen)


def spread(q: torch.Tensor, k: torch.Tensor, ratio: float) -> tuple:
    """q with its first WIDE_CHANNELS channels ``ratio`` times larger, k with them as much smaller."""
    q, k = q.clone(), k.clone()
    q[..., :WIDE_CHANNELS] *= ratio
    k[..., :WIDE_CHANNELS] /= ratio
    return q, k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dtype, where = run_on(args.device)
    print(f"# {args.heads} heads x {args.seq} tokens, D = {DIM}, slices of {SLICE_M}, rows' sums of squares "
          f"scaled within {E4M3_ROW_SUMSQ:g}, {where}, {str(dtype).split('.')[1]}")
    print("| logit std | R | d | oracle rel L2 | exact LSE, inputs | exact LSE, e4m3 | estimated, inputs "
          "| estimated, e4m3 |")
    print("|---|---|---|---|---|---|---|---|")
    for logit_std in (1.0, 3.0):
        q0, k0, v = heads(logit_std, args.heads, args.seq, args.seed)
        judge = Judge(*(t.to(args.device, dtype) for t in (q0, k0, v)), SLICE_M)
        for ratio in (1, 100, 1000, 10000):
            q, k = (t.to(args.device, dtype) for t in spread(q0, k0, ratio))
            for d in (0.1, 0.3):
                cells = [judge.ratio(predict_mask(q, k, SLICE_M, "colmax", lse=lse, products=products,
                                                  density=d))[1]
                         for lse in (judge.lse, "estimate") for products in ("input", "e4m3")]
                print(f"| {logit_std:g} | {ratio} | {d} | {judge.oracle_error(d):.3g} | "
                      + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()

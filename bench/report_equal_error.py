"""fgcupy against FlexAttention at equal output error, per head family (one GPU).

For each family of fgcupy.head_families (--heads heads at the preset's size) and each slice
density d, both formats get their best mask (fgcupy.oracle.Judge):
  * fgcupy runs the oracle slice mask of density d (exact column-max top-k per query block);
  * FlexAttention runs the oracle 128x128 block mask with the fewest key blocks per query
    block whose output error is at most the slice mask's (bisection, Judge.blocks_for_error).
Both are timed in the same run (CUDA-event medians after warm-up), beside SDPA cuDNN on the
same heads; the speed-up is FlexAttention's time over fgcupy's. Errors are relative L2 of the
whole output against dense float32 attention.

    PYTHONPATH=. python -m bench.report_equal_error [--preset wan14b-480p] [--densities 0.1 0.3]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from bench.report_peers import gpu_header
from bench.timing import cuda_time_ms, require_cuda
from fgcupy import SparseAttention
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.oracle import Judge
from fgcupy.workloads import SHAPES

BLOCK = 128


def family_rows(family: str, shape, densities, heads: int, reps: int, flex, seed: int = 0) -> list:
    """One row per density: the slice and block oracles at equal error, both timed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = family_qkv(shape, family, heads=heads, seed=seed, device="cuda")
    judge = Judge(q, k, v, BLOCK)

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    cudnn_ms = cuda_time_ms(sdpa, reps=reps)["median_ms"]
    rows = []
    for density in densities:
        slice_mask = judge.oracle(density)
        slice_error = judge.oracle_error(density)
        plan = SparseAttention().plan(slice_mask, head_dim=q.shape[-1], dtype=q.dtype)
        out = torch.empty_like(q)
        fg_ms = cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=reps)["median_ms"]
        blocks, block_error = judge.blocks_for_error(slice_error, BLOCK)
        block_slices = judge.block_oracle_of(blocks, BLOCK)
        block_mask = block_slices.to_block_mask(BLOCK, exact=False)
        flex_ms = cuda_time_ms(lambda: flex(q, k, v, block_mask=block_mask), reps=reps)["median_ms"]
        row = dict(family=family, density=density, slice_error=slice_error, block_density=block_slices.density(),
                   block_error=block_error, fgcupy_ms=fg_ms, flex_ms=flex_ms, speedup=flex_ms / fg_ms,
                   cudnn_dense_ms=cudnn_ms, spec=plan.spec.name)
        print(f"{family:17s} d={density:<5} slice err {slice_error:.4f}  block density {row['block_density']:.3f} "
              f"(err {block_error:.4f})  fgcupy {fg_ms:7.3f} ms  flex {flex_ms:7.3f} ms  x{row['speedup']:.2f}"
              f"  (cuDNN dense {cudnn_ms:.2f} ms)", flush=True)
        rows.append(row)
        del plan, out, block_mask
    del judge, q, k, v
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-480p", choices=sorted(SHAPES))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    require_cuda("bench.report_equal_error")

    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    header = f"{gpu_header()} | preset {args.preset} | {args.heads} heads per family | {BLOCK}x{BLOCK} blocks"
    print(header, flush=True)
    started = time.perf_counter()
    rows = []
    for family in args.families:
        rows += family_rows(family, SHAPES[args.preset], args.densities, args.heads, args.reps, flex)
    print(f"[{time.perf_counter() - started:.0f} s]\n")
    print("| family | slice density | oracle slice error | equal-error block density | fgcupy ms | FlexAttention ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['density']} | {r['slice_error']:.4f} | {r['block_density']:.3f} | "
              f"{r['fgcupy_ms']:.3f} | {r['flex_ms']:.3f} | {r['speedup']:.2f}x |")
    for density in args.densities:
        mine = [r for r in rows if r["density"] == density]
        worst = min(mine, key=lambda r: r["speedup"])
        print(f"d={density}: slowest speed-up {worst['speedup']:.2f}x ({worst['family']}), "
              f"geometric mean {math.exp(sum(math.log(r['speedup']) for r in mine) / len(mine)):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

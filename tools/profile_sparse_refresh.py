"""What a sparse refresh costs on the full problem (wan14b-480p, mixed workload, all heads; GPU),
beside SDPA cuDNN dense in the same run (CUDA-event medians, isolated calls):

    PYTHONPATH=. python -m tools.profile_sparse_refresh [--densities 0.1 0.3] [--reps 10]

Per density d: the old mask (the exact one of this step), the cheap top-k prediction, the sparse
attention through the old mask with its LSE, and the exact column max over the two masks' keys
(predict_mask(method="colmax", candidates=...)), and its scoring pass alone on each scoring
kernel (list mode; the rest is zeroing the score rows and the top-k selection). Then the
candidates as SparseAttentionConfig builds them (fgcupy.union_keys: every key once): the two
masks' union (sparse_refresh=True), with the old keys moved by a token, a row or a frame of the
grid (local_search=True; one kind a refresh), and moved keys without the predictor's; for each,
the union kernel and the column max over it. A sparse refresh adds the cheap top-k prediction, the
union and its column max to a refresh step (its attention call runs anyway).
"""

from __future__ import annotations

import argparse
import math

import torch

from fgcupy import mask_kernels, predict_mask, sparse_attention
from fgcupy.local_search import grid_offsets, union_keys
from fgcupy import mask_reference as ref
from fgcupy.mask import num_blocks
from fgcupy.oracle import exact_lse
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import SHAPES, video_qkv

from bench.cases import sdpa_call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--preset", default="wan14b-480p", choices=list(SHAPES))
    args = parser.parse_args(argv)
    shape = SHAPES[args.preset]
    q, k, v = video_qkv(shape, "mixed", device="cuda")
    scale = 1.0 / math.sqrt(shape.head_dim)
    print(f"{torch.cuda.get_device_name()} | {args.preset} {tuple(q.shape)} | medians of {args.reps}", flush=True)
    dense_ms = None

    def record(what, fn):
        nonlocal dense_ms
        ms = cuda_time_ms(fn, warmup=2, reps=args.reps)["median_ms"]
        dense_ms = ms if dense_ms is None else dense_ms
        print(f"  {what:58s} {ms:8.3f} ms  {100 * ms / dense_ms:6.1f} % of cuDNN dense", flush=True)

    record("sdpa-cudnn dense", sdpa_call(q, k, v, "cudnn"))
    lse = exact_lse(q, k, scale)
    bh, q_blocks, kv_len = shape.batch * shape.heads, num_blocks(shape.seq, 128), shape.seq
    for density in args.densities:
        old = predict_mask(q, k, 128, "colmax", rule="topk", density=density, lse=lse)
        default = predict_mask(q, k, 128, "topk", density=density)
        sparse_lse = sparse_attention(q, k, v, old, return_lse=True)[1]
        union = float((old.to_dense() | default.to_dense()).float().mean())
        print(f"d={density}: scored {old.density() + default.density():.3f} of all slices (both masks), "
              f"their union {union:.3f}")
        record(f"predict topk d={density} (default)", lambda d=density: predict_mask(q, k, 128, "topk", density=d))
        record("sparse attention through the old mask, with LSE",
               lambda o=old: sparse_attention(q, k, v, o, return_lse=True))
        for kernel in mask_kernels.SCORE_KERNELS[1:]:
            scores = torch.zeros(bh, q_blocks, mask_kernels.row_stride(kv_len, 2), dtype=ref.PROB_DTYPE,
                                 device="cuda")

            def score(o=old, c=default, s=scores, kernel=kernel):
                for mask in (o, c):
                    mask_kernels.gpu_candidate_colmax(q, k, scale, sparse_lse.reshape(bh, -1), mask, s,
                                                      kernel=kernel)

            try:
                record(f"  list-mode scoring pass over both masks ({kernel})", score)
            except ValueError as err:  # the wgmma kernel off Hopper
                print(f"  ({kernel}: {err})")
        record(f"colmax over candidates d={density} (predict_mask, auto kernel)",
               lambda d=density, o=old, c=default: predict_mask(q, k, 128, "colmax", rule="topk", density=d,
                                                                lse=sparse_lse, candidates=[o, c]))
        token, row, frame = grid_offsets(shape.grid)
        unions = {"old + default": ((0,), default), "old moved by a token + default": ((0, token, -token), default),
                  "old moved by a row + default": ((0, row, -row), default),
                  "old moved by a frame + default": ((0, frame, -frame), default),
                  "old moved by a row, no predictor": ((0, row, -row), None)}
        for name, (offsets, extra) in unions.items():
            joined = union_keys(old, offsets, extra)
            print(f"  {name}: {joined.density():.3f} of all slices", flush=True)
            record("    union_keys", lambda o=old, m=offsets, e=extra: union_keys(o, m, e))
            record("    colmax over the union",
                   lambda d=density, j=joined: predict_mask(q, k, 128, "colmax", rule="topk", density=d,
                                                            lse=sparse_lse, candidates=[j]))


if __name__ == "__main__":
    main()

"""A short demonstration of fgcupy's main job: ``python -m fgcupy.demo``.

On a CUDA GPU: video-like q, k, v of Wan 2.1 1.3B at 480p (12 heads x 32,760 tokens, head dim
128, bf16, from ``fgcupy.workloads``), a slice mask predicted at 20 % density, slice-sparse
attention checked against dense float32 attention on two heads, and its time beside dense SDPA.
Without a GPU it says so and runs the same steps with the torch reference on a small grid.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .jit.runtime import kernels_can_run
from .reference import dense_attention, reference_attention, relative_l2
from .scoring import predict_mask
from .timing import cuda_time_ms
from .workloads import SHAPES, VideoShape, video_qkv


def run_gpu(shape: VideoShape, density: float) -> None:
    from .attention import SparseAttention

    q, k, v = video_qkv(shape, "mixed", device="cuda", dtype=torch.bfloat16)
    mask = predict_mask(q, k, slice_m=128, method="topk", density=density)
    plan = SparseAttention().plan(mask, head_dim=shape.head_dim, dtype=torch.bfloat16)
    out = plan.run(q, k, v)
    err = relative_l2(out[:, :2].float(), dense_attention(q[:, :2], k[:, :2], v[:, :2]))
    predict_ms = cuda_time_ms(lambda: predict_mask(q, k, slice_m=128, method="topk", density=density))["median_ms"]
    sparse_ms = cuda_time_ms(lambda: plan.run(q, k, v, out=out))["median_ms"]
    dense_ms = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))["median_ms"]
    print(f"GPU: {torch.cuda.get_device_name()}; kernel {plan.spec.name}")
    print(f"problem: {shape.name}, {shape.heads} heads x {shape.seq} tokens x {shape.head_dim}, bf16, video-like inputs")
    print(f"mask: top-k (sub-blocks of 32 queries, exact band), density {mask.density():.3f} (slices of 128 queries x 1 key)")
    print(f"relative L2 error vs dense float32 attention (2 heads): {err:.4f}")
    print(f"fgcupy sparse attention {sparse_ms:.2f} ms (+ {predict_ms:.2f} ms to predict the mask, reused across "
          f"steps) vs dense SDPA {dense_ms:.2f} ms: {dense_ms / sparse_ms:.2f}x")


def run_cpu(density: float) -> None:
    print("fgcupy's kernels cannot run here (no CUDA GPU, or neither libnvrtc with libcuda nor cupy).")
    print("Running the same steps with the float32 reference on a small video grid instead.")
    shape = VideoShape("demo-cpu", 1, 2, 64, (4, 8, 16))
    q, k, v = video_qkv(shape, "mixed", dtype=torch.float32)
    mask = predict_mask(q, k, slice_m=64, method="topk", density=density)
    out, _ = reference_attention(q, k, v, mask)
    err = relative_l2(out, dense_attention(q, k, v))
    print(f"{shape.heads} heads x {shape.seq} tokens, predicted mask density {mask.density():.2f}: "
          f"relative L2 vs dense attention {err:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="wan1.3b-480p", choices=sorted(SHAPES))
    parser.add_argument("--density", type=float, default=0.2)
    args = parser.parse_args(argv)
    if kernels_can_run():
        run_gpu(SHAPES[args.shape], args.density)
    else:
        run_cpu(args.density)
    return 0


if __name__ == "__main__":
    sys.exit(main())

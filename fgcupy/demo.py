"""A short demonstration of fgcupy's main job: ``python -m fgcupy.demo``.

On a CUDA GPU: slice-sparse attention at 30 % density on a Wan 2.1 1.3B 480p-sized problem
(12 heads x 32,760 tokens, head dim 128, bf16), checked against the float32 reference on two
heads and timed beside dense SDPA. Without a GPU it says so and runs the reference path on a
small case instead.
"""

from __future__ import annotations

import argparse
import sys

import torch

from .bridge import cupy_available
from .mask import SliceMask, random_topk_mask
from .reference import dense_attention, reference_attention, relative_l2
from .timing import cuda_time_ms


def run_gpu(heads: int, seq: int, density: float) -> None:
    from .attention import SparseAttention

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, 128, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
    mask = random_topk_mask(1, heads, seq, seq, 128, density, device, torch.Generator(device=device).manual_seed(1))
    plan = SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16)
    out = plan.run(q, k, v)
    # Exactness on two heads against the float32 reference.
    sub = SliceMask(mask.indptr[:, :2], mask.indices, mask.slice_m, mask.q_len, mask.kv_len)
    ref, _ = reference_attention(q[:, :2], k[:, :2], v[:, :2], sub)
    err = relative_l2(out[:, :2].float(), ref)
    sparse_ms = cuda_time_ms(lambda: plan.run(q, k, v, out=out))["median_ms"]
    dense_ms = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))["median_ms"]
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"problem: 1 x {heads} heads x {seq} tokens x 128, bf16; mask density {mask.density():.3f} (slice 128x1)")
    print(f"relative L2 error vs float32 reference (2 heads): {err:.2e}")
    print(f"fgcupy sparse: {sparse_ms:.2f} ms   dense SDPA: {dense_ms:.2f} ms   speedup {dense_ms / sparse_ms:.2f}x")


def run_cpu() -> None:
    print("No CUDA GPU found (torch.cuda or cupy sees no device): fgcupy's kernels need one.")
    print("Running the float32 reference path on a small case instead.")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 64, generator=gen) for _ in range(3))
    mask = random_topk_mask(1, 2, 512, 512, 64, 0.3, "cpu", torch.Generator().manual_seed(1))
    out, _ = reference_attention(q, k, v, mask)
    err = relative_l2(out, dense_attention(q, k, v))
    print(f"reference slice-sparse attention, 1 x 2 heads x 512 tokens, density {mask.density():.2f}: "
          f"relative L2 vs dense attention {err:.3f} (random inputs have no structure to exploit)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=32_760)
    parser.add_argument("--density", type=float, default=0.3)
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and cupy_available():
        run_gpu(args.heads, args.seq, args.density)
    else:
        run_cpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the cheap top-k prediction's GPU time goes: per-kernel times (torch profiler, per call over 5
calls after warm-up) of predict_mask top-k 0.1 with pooling "adaptive" (the default) and "mean"
on wan14b-480p, on the video-like "mixed" heads (coherent: nothing dilated) and on
temporal-strided heads (every block sampled and dilated) (GPU):

    PYTHONPATH=. python -m tools.profile_pooling_kernels
"""

import torch
from torch.profiler import ProfilerActivity, profile

from fgcupy import predict_mask
from fgcupy.head_families import family_qkv
from fgcupy.workloads import SHAPES, video_qkv


def report(name: str, q, k) -> None:
    for pooling in ("adaptive", "mean"):
        def call():
            predict_mask(q, k, 128, "topk", density=0.1, pooling=pooling)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        print(f"\n## {name}, pooling {pooling}: per call (5 calls)")
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        for e in rows[:14]:
            print(f"  {e.device_time_total / 5 / 1000:7.3f} ms  x{e.count // 5:<3d} {e.key[:90]}")
        print(f"  total {sum(e.device_time_total for e in rows) / 5 / 1000:.3f} ms")


def main() -> None:
    shape = SHAPES["wan14b-480p"]
    print(torch.cuda.get_device_name())
    q, k, _ = video_qkv(shape, "mixed", seed=0, device="cuda")
    report("workload-mixed", q, k)
    q, k, _ = family_qkv(shape, "temporal-strided", heads=shape.heads, device="cuda")
    report("temporal-strided", q, k)


if __name__ == "__main__":
    main()

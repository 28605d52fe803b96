"""Where a mask refresh's GPU time goes at 32,760 and 75,600 tokens: the integration's prediction (top-k) and
the plan, beside SDPA cuDNN dense attention in the same run, then the kernels of one of each.

    PYTHONPATH=. python -m tools.profile_refresh
"""

import torch

from bench.cases import sdpa_call
from fgcupy import SparseAttention, predict_mask
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import SHAPES, video_qkv


def ms(fn):
    return cuda_time_ms(fn, warmup=2, reps=5, queued=True)["median_ms"]


def main():
    print(torch.cuda.get_device_name())
    for name in ("wan14b-480p", "wan14b-720p"):
        shape = SHAPES[name]
        q, k, v = video_qkv(shape, "mixed", seed=0, device="cuda")
        dense = ms(sdpa_call(q, k, v, "cudnn"))
        predict = ms(lambda: predict_mask(q, k, 128, "topk", density=0.1))
        mask = predict_mask(q, k, 128, "topk", density=0.1)
        plan = ms(lambda: SparseAttention().plan(mask, head_dim=shape.head_dim, dtype=q.dtype))
        print(f"{name} S={shape.seq}: cuDNN {dense:.2f} ms, predict {predict:.2f} ms ({100 * predict / dense:.1f} %), "
              f"plan {plan:.2f} ms ({100 * plan / dense:.1f} %)", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            SparseAttention().plan(predict_mask(q, k, 128, "topk", density=0.1), head_dim=shape.head_dim, dtype=q.dtype)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
        del q, k, v, mask
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

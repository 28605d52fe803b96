"""Where a refresh's time goes at 75,600 tokens: predict_mask and plan (H200)."""
import math
import torch
from fgcupy import SparseAttention, predict_mask
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import SHAPES, video_qkv
from bench.cases import sdpa_call

for name in ("wan14b-480p", "wan14b-720p"):
    shape = SHAPES[name]
    q, k, v = video_qkv(shape, "mixed", seed=0, device="cuda")
    ms = lambda fn: cuda_time_ms(fn, warmup=2, reps=5, queued=True)["median_ms"]
    dense = ms(sdpa_call(q, k, v, "cudnn"))
    pred = ms(lambda: predict_mask(q, k, 128, density=0.1))
    mask = predict_mask(q, k, 128, density=0.1)
    plan = ms(lambda: SparseAttention().plan(mask, head_dim=128, dtype=q.dtype))
    print(f"{name} S={shape.seq}: cuDNN {dense:.2f} ms, predict {pred:.2f} ms ({100*pred/dense:.1f} %), plan {plan:.2f} ms ({100*plan/dense:.1f} %)", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        m = predict_mask(q, k, 128, density=0.1)
        SparseAttention().plan(m, head_dim=128, dtype=q.dtype)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    del q, k, v, mask, m
    torch.cuda.empty_cache()

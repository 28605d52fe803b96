"""Run mean-query top-k prediction's stages on the wan14b-480p video-like workload a few
times, for ncu to profile the scoring and selection kernels.

    ncu --clock-control none --kernel-name regex:"mask_score|select_rows" --launch-skip 2 \\
        --launch-count 2 python3 -m tools.profile_masks [method] [--table] [--host]

--table lists every GPU kernel of one prediction; --host profiles the host (cProfile, 30 calls):
where the launch work of a prediction goes.
"""

import sys

import torch

from fgcupy import predict_mask
from fgcupy.workloads import SHAPES, video_qkv

method = next((a for a in sys.argv[1:] if not a.startswith("--")), "topk")
options = {"topk": dict(density=0.1), "threshold": dict(threshold=1e-4)}.get(method, {})
q, k, _ = video_qkv(SHAPES["wan14b-480p"], "mixed", seed=0, device="cuda")
for _ in range(3):
    predict_mask(q, k, 128, method, **options)
torch.cuda.synchronize()
if "--table" in sys.argv:
    # Every GPU kernel of one prediction, with its time: what the stages leave out.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        predict_mask(q, k, 128, method, **options)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
if "--host" in sys.argv:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(30):
        predict_mask(q, k, 128, method, **options)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)

"""Run mean-query top-k prediction's stages on the wan14b-480p video-like workload a few
times, for ncu to profile the scoring and selection kernels.

    ncu --clock-control none --kernel-name regex:"mask_score|select_rows" --launch-skip 2 \\
        --launch-count 2 python3 -m bench.profile_masks [method]
"""

import sys

import torch

from fgcupy import predict_mask
from fgcupy.workloads import SHAPES, video_qkv

method = sys.argv[1] if len(sys.argv) > 1 else "topk"
options = dict(density=0.1) if method == "topk" else {}
q, k, _ = video_qkv(SHAPES["wan14b-480p"], "mixed", seed=0, device="cuda")
for _ in range(3):
    predict_mask(q, k, 128, method, **options)
torch.cuda.synchronize()

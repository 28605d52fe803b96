"""Each scoring pass twice on wan14b-480p's video-like inputs, for a profiler to attach to:
the column-max pass (every query, groups of 128), the default's pooled stats and
max-probability passes, then one default prediction. Prints nothing of its own timing.

    ncu --clock-control none -k regex:mask_score_sm90 --launch-skip 1 --launch-count 3 \\
        python -m tools.run_scoring_passes
"""

import torch

from fgcupy import mask_kernels, predict_mask
from fgcupy.oracle import exact_lse
from tools.scoring_setup import scoring_setup


def main() -> None:
    setup = scoring_setup()
    q, k, scale, heads = setup.q, setup.k, setup.scale, setup.shape.heads
    lse = exact_lse(q, k, scale).reshape(heads, -1)
    for _ in range(2):
        mask_kernels.gpu_scores("maxprob", q, k, scale, lse=lse, group=128, warps=8, kernel="wgmma")
        mask_kernels.gpu_scores("stats", setup.pooled, k, scale, warps=8, kernel="wgmma")
        mask_kernels.gpu_scores("maxprob", setup.pooled, k, scale, lse=setup.pooled_lse, group=4, warps=8,
                                kernel="wgmma")
        predict_mask(q, k, 128, method="topk", density=0.1)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Where ``estimate_lse``'s time goes on a GPU, beside SDPA cuDNN dense attention of the same heads.

    PYTHONPATH=. python -m tools.profile_estimate     (GPU; wan14b-480p, 40 heads; queued medians)

Prints each part of the estimate (the block means of the finite queries, their LSE over every
few keys, the band part on the scoring stats kernel), the whole estimate, and the column-max
prediction that uses it, as ms and % of cuDNN.
"""

from __future__ import annotations

import torch

import fgcupy.lse_estimate as le
import fgcupy.mask_reference as ref
from fgcupy import predict_mask
from tools.scoring_setup import queued_ms, scoring_setup


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    s = scoring_setup()
    q, k, dense = s.q, s.k, s.dense_ms
    first_q, first_k = q[0], k[0]  # [H, S, D]: the per-batch views estimate_lse works on
    means, _ = le.finite_block_means(first_q, 128)
    block_of_query = torch.arange(q.shape[2], device=q.device) // 128
    print(f"SDPA cuDNN dense: {dense:.3f} ms")
    parts = {
        "finite_block_means": lambda: le.finite_block_means(first_q, 128),
        "sampled_lse of the block means (torch float32)":
            lambda: ref.sampled_lse(means.unsqueeze(0), first_k.unsqueeze(0), s.scale),
        "block_mean_lse (the two above and the spread to queries)":
            lambda: le.block_mean_lse(first_q, first_k, 128, s.scale, block_of_query),
        "band part on the stats kernel": lambda: le._kernel_band_lse(q, k, 128, le.ESTIMATE_BAND, s.scale),
        "estimate_lse": lambda: le.estimate_lse(q, k, 128, scale=s.scale),
        "predict_mask colmax lse=estimate top-k 0.1":
            lambda: predict_mask(q, k, 128, "colmax", lse="estimate", rule="topk", density=0.1),
    }
    for name, fn in parts.items():
        ms = queued_ms(fn)
        print(f"{name}: {ms:.3f} ms = {100 * ms / dense:.2f} %")


if __name__ == "__main__":
    main()

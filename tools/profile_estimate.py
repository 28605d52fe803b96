"""Where ``estimate_lse``'s time goes on a GPU, beside SDPA cuDNN dense attention of the same heads.

    PYTHONPATH=. python -m tools.profile_estimate     (GPU; wan14b-480p, 40 heads; queued medians)

Prints each part of the estimate (the band, and the sampled keys less each block's band, on the
scoring stats kernel), the whole estimate, and the column-max prediction that uses it,
as ms and % of cuDNN.
"""

from __future__ import annotations

import fgcupy.lse_estimate as le
from fgcupy import predict_mask
from fgcupy.mask import num_blocks
from fgcupy.mask_kernels import gpu_scores
from tools.scoring_setup import queued_ms, scoring_setup


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    s = scoring_setup()
    q, k, dense = s.q, s.k, s.dense_ms
    heads, kv_len = q.shape[0] * q.shape[1], k.shape[2]
    sampled, _ = le._sampled_keys(k)
    skip = (le._band_sample_ranges(num_blocks(q.shape[2], 128), 128, le.ESTIMATE_BAND, kv_len, q.device), 128)
    band = (-le.ESTIMATE_BAND, 128 + 2 * le.ESTIMATE_BAND)
    print(f"SDPA cuDNN dense: {dense:.3f} ms")
    parts = {
        "band on the stats kernel": lambda: gpu_scores("stats", q, k, s.scale, nbh=heads, warps=8, band=band),
        "gather of the sampled keys": lambda: le._sampled_keys(k),
        "sampled keys on the stats kernel, the band's skipped": lambda: gpu_scores("stats", q, sampled, s.scale,
                                                                                    nbh=heads, warps=8, skip=skip),
        "estimate_lse": lambda: le.estimate_lse(q, k, 128, scale=s.scale),
        "predict_mask colmax lse=estimate top-k 0.1":
            lambda: predict_mask(q, k, 128, "colmax", lse="estimate", rule="topk", density=0.1),
    }
    for name, fn in parts.items():
        ms = queued_ms(fn)
        print(f"{name}: {ms:.3f} ms = {100 * ms / dense:.2f} %")


if __name__ == "__main__":
    main()

"""The scoring passes of mask prediction on both kernels, and whole predictions, beside SDPA
cuDNN in the same run (wan14b-480p, mixed pattern; queued GPU time, CUDA-event medians).

    PYTHONPATH=. python -m tools.profile_scoring [--table]

Prints, for the mma.sync kernel and (on Hopper) the wgmma kernel: the exact column-max pass
(every query, groups of 128, LSE given), and the two pooled passes of the cheap top-k predictor
(pool 32: stats, then max-probability over groups of 4) and, on wgmma, the exact band in two
launches against the fused one; then predict_mask's default, its
sampled and combined poolings, and column-max predictions (with a dense step's LSE and with
the estimated one, fgcupy.lse_estimate, whose estimate is also timed alone). --table adds the GPU kernels of one default prediction.
"""

import torch

from fgcupy import mask_kernels, predict_mask
from fgcupy.lse_estimate import estimate_lse
from fgcupy.oracle import exact_lse
from tools.scoring_setup import queued_ms, scoring_setup


def main():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="add the GPU kernels of one default prediction")
    args = parser.parse_args()
    setup = scoring_setup()
    q, k, scale, pooled, pooled_lse, dense = (setup.q, setup.k, setup.scale, setup.pooled, setup.pooled_lse,
                                              setup.dense_ms)
    heads, seq, dim = setup.shape.heads, setup.shape.seq, setup.shape.head_dim
    lse = exact_lse(q, k, scale)
    flops = 2 * heads * seq * seq * dim  # one Q K^T
    ms = queued_ms
    kernels = ["mma"] + (["wgmma"] if torch.cuda.get_device_capability() == (9, 0) else [])
    for kernel in kernels:
        t = ms(lambda: mask_kernels.gpu_scores("maxprob", q, k, scale, lse=lse.reshape(heads, -1), group=128,
                                               warps=8, kernel=kernel))
        print(f"{kernel:5s} column-max pass: {t:.3f} ms = {flops / t / 1e9:.0f} TFLOP/s = {t / dense:.3f} x cuDNN")
        stats = ms(lambda: mask_kernels.gpu_scores("stats", pooled, k, scale, warps=8, kernel=kernel))
        maxprob = ms(lambda: mask_kernels.gpu_scores("maxprob", pooled, k, scale, lse=pooled_lse, group=4, warps=8,
                                                     kernel=kernel))
        print(f"{kernel:5s} pool-32 stats pass {stats:.3f} ms ({flops / 32 / stats / 1e9:.0f} TFLOP/s), "
              f"max-probability pass {maxprob:.3f} ms ({flops / 32 / maxprob / 1e9:.0f} TFLOP/s)")
    if "wgmma" in kernels:
        _exact_band(q, k, scale, pooled, pooled_lse, ms)
    per_head = ["mean", "both"] * (heads // 2) + ["mean"] * (heads % 2)
    for name, kw in (("default, top-k d=0.1", dict(method="topk", density=0.1)),
                     ("pooling per head (mean, both alternating), top-k d=0.1",
                      dict(method="topk", density=0.1, pooling=per_head)),
                     ("default, top-k d=0.3", dict(method="topk", density=0.3)),
                     ("pooling=sample, top-k d=0.1", dict(method="topk", density=0.1, pooling="sample")),
                     ("pooling=both, top-k d=0.1", dict(method="topk", density=0.1, pooling="both")),
                     ("pooling=both, top-k d=0.3", dict(method="topk", density=0.3, pooling="both")),
                     ("pooling=both pool=64, top-k d=0.1", dict(method="topk", density=0.1, pool=64, pooling="both")),
                     ("pooling=both pool=64, top-k d=0.3", dict(method="topk", density=0.3, pool=64, pooling="both")),
                     ("column max, top-k d=0.1", dict(method="colmax", lse=lse, rule="topk", density=0.1)),
                     ("column max with estimated LSE, top-k d=0.1",
                      dict(method="colmax", lse="estimate", rule="topk", density=0.1))):
        t = ms(lambda: predict_mask(q, k, 128, **kw))
        print(f"predict_mask {name}: {t:.3f} ms = {100 * t / dense:.2f} % of cuDNN dense")
    t = ms(lambda: estimate_lse(q, k, 128, scale=scale))
    print(f"estimate_lse alone: {t:.3f} ms = {100 * t / dense:.2f} % of cuDNN dense")
    if args.table:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            predict_mask(q, k, 128, "topk", density=0.1)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))


def _exact_band(q, k, scale, pooled, pooled_lse, ms):
    """The default's exact band (64 keys either side) on wgmma: a stats launch, torch's log-add
    and a max-probability launch, against the fused band launch (mask_kernels.gpu_refine_band)."""
    seq, band = q.shape[2], (-64, 256)
    base = mask_kernels.gpu_scores("maxprob", pooled, k, scale, lse=pooled_lse, group=4, warps=8)

    def two_launches(out):
        band_lse = mask_kernels.gpu_scores("stats", q, k, scale, warps=8, band=band, kernel="wgmma")
        own = pooled_lse.repeat_interleave(32, dim=1)[:, :seq]
        return mask_kernels.gpu_scores("maxprob", q, k, scale, lse=torch.logaddexp(band_lse, own), group=128,
                                       warps=8, band=band, out=out, kernel="wgmma")

    def fused(out):
        return mask_kernels.gpu_refine_band(q, k, scale, pooled_lse, 32, 128, band, out, kernel="wgmma")

    a, b = two_launches(base.clone()), fused(base.clone())
    rel = float(((a - b).abs() / a.abs().clamp_min(1e-30))[..., :seq].max())
    work = base.clone()
    print(f"wgmma exact band: two launches and a log-add {ms(lambda: two_launches(work)):.3f} ms, "
          f"fused {ms(lambda: fused(work)):.3f} ms (largest relative difference {rel:.1e})")


if __name__ == "__main__":
    main()

"""What ``predict_mask(method="auto")`` costs and how many heads it predicts again, per head
family, beside the cheap top-k alone and the estimated column max, as % of SDPA cuDNN dense attention of
the same heads (CUDA-event medians of calls timed one by one, since "auto" waits on the host to
pick its heads; one process). ``--parts``: where one family's "auto" call spends its time, and
the estimated column max its flagged heads pay (its pass on e4m3 products, as it runs on
Hopper, and on the inputs' for comparison); with ``--kernels`` the GPU kernels of its parts.

    PYTHONPATH=. python -m tools.profile_auto_mask     (GPU; wan14b-480p grid, 8 heads per family)
"""

from __future__ import annotations

import argparse

import torch

from bench.cases import sdpa_call
from bench.timing import require_cuda
from fgcupy import auto_mask, predict_mask, scoring
from fgcupy.lse_estimate import estimate_lse
from fgcupy.e4m3 import heads_as_e4m3
from fgcupy.e4m3_kernels import gpu_heads_as_e4m3
from fgcupy.mask_kernels import e4m3_runs, gpu_colmax, gpu_colmax_e4m3, gpu_select
from fgcupy.head_families import FAMILIES, family_qkv
from fgcupy.workloads import PATTERNS, SHAPES, video_qkv
from fgcupy.timing import cuda_time_ms
from tools.scoring_setup import queued_ms


def call_ms(fn) -> float:
    """CUDA-event median of 10 calls timed one by one (host syncs inside ``fn`` included; queued
    timing, tools.scoring_setup.queued_ms, lets the host run ahead up to the first sync)."""
    return cuda_time_ms(fn, warmup=2, reps=10)["median_ms"]


def parts(q, k, d: float) -> None:
    """Each step of one "auto" call on q, k, timed alone."""
    scale = q.shape[-1] ** -0.5
    rule = dict(density=d, top_k=None, scale=scale, workspace_bytes=1 << 32)
    cheap = predict_mask(q, k, 128, "topk", density=d)
    metric = auto_mask.key_metric_factor(k).to(q.dtype)
    blocks, _ = auto_mask.checked_blocks(q, k, 128)
    rows, _ = auto_mask._rows_of(blocks, 128, q.shape[2])
    q_rows = q.gather(2, rows[..., None].expand(-1, -1, -1, q.shape[3]))
    exact = auto_mask.exact_row_lse(q_rows, k, scale)
    estimate = estimate_lse(q, k, 128)
    lse = estimate.reshape(-1, q.shape[2])
    colmax = gpu_colmax(q, k, scale, lse, 128)  # the selection's input
    colmax_rule = scoring.make_request(q.shape[-1], k.shape[2], 128, "colmax", rule="topk", density=d)
    on_e4m3 = e4m3_runs(q.device, q.shape[3])  # the estimated column max's own pass where it runs
    check = auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule)
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=d)
    steps = {
        "cheap top-k": lambda: predict_mask(q, k, 128, "topk", density=d),
        "the keys' metric (its factor)": lambda: auto_mask.key_metric_factor(k),
        "the blocks' farthest queries in it": lambda: auto_mask.block_outlier(q, 128, metric),
        "the checked blocks (even and widest)": lambda: auto_mask.checked_blocks(q, k, 128),
        "checked rows' exact LSE (of their logits and twice them)": lambda: auto_mask.exact_row_lse(q_rows, k, scale,
                                                                                                    twice=True),
        "  of their logits alone": lambda: auto_mask.exact_row_lse(q_rows, k, scale),
        "their best mask (column max)": lambda: predict_mask(q_rows, k, 128, "colmax", lse=exact, rule="topk", **rule),
        "check_heads (the check, no host sync)": lambda: auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule),
        "flagged_heads (the check and its sync)": lambda: auto_mask.flagged_heads(
            auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule)),
        "the estimate's check (no host sync)": lambda: check.against(estimated, k, scale),
        "estimated column max, all heads": lambda: predict_mask(q, k, 128, "colmax", lse="estimate", density=d),
        "  its LSE estimate": lambda: estimate_lse(q, k, 128),
        **({"  its column-max pass (e4m3)": lambda: gpu_colmax_e4m3(q, k, scale, lse, 128),
            "    of it, q and k to e4m3": lambda: gpu_heads_as_e4m3(q, k, 0, q.shape[0] * q.shape[1]),
            "    the same in torch ops": lambda: heads_as_e4m3(q, k, 0, q.shape[0] * q.shape[1])} if on_e4m3 else {}),
        "  the pass on the inputs' products": lambda: gpu_colmax(q, k, scale, lse, 128),
        "  its selection": lambda: gpu_select(colmax, k.shape[2], colmax_rule),
        "estimated column max on the inputs' products": lambda: predict_mask(q, k, 128, "colmax", lse="estimate",
                                                                             density=d, products="input"),
        "auto": lambda: predict_mask(q, k, 128, "auto", density=d),
    }
    for name, fn in steps.items():
        print(f"  {name}: {call_ms(fn):.3f} ms one by one, {queued_ms(fn):.3f} ms queued", flush=True)


def kernel_table(q, k, d: float, calls: int = 5) -> None:
    """The GPU kernels of the cheap top-k, the check and the estimated column max on q, k (torch's
    profiler, per call: the mean over ``calls`` calls after warm-up), longest first."""
    from torch.profiler import ProfilerActivity, profile

    scale = q.shape[-1] ** -0.5
    rule = dict(density=d, top_k=None, scale=scale, workspace_bytes=1 << 32)
    cheap = predict_mask(q, k, 128, "topk", density=d)
    steps = {
        "cheap top-k": lambda: predict_mask(q, k, 128, "topk", density=d),
        "the check (no host sync)": lambda: auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule),
        "estimated column max": lambda: predict_mask(q, k, 128, "colmax", lse="estimate", density=d),
    }
    for name, fn in steps.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        per_kernel: dict = {}
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                count, total = per_kernel.get(event.name, (0, 0.0))
                per_kernel[event.name] = (count + 1, total + event.device_time_total)
        print(f"  {name}: {sum(t for _, t in per_kernel.values()) / calls / 1e3:.3f} ms of kernels per call")
        for kernel, (count, total) in sorted(per_kernel.items(), key=lambda item: -item[1][1]):
            print(f"    {total / calls / 1e3:7.3f} ms  x{count // calls:<3d} {kernel[:100]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--parts", metavar="FAMILY", help="time each step of one call on this head family (d: the first density)")
    parser.add_argument("--kernels", action="store_true", help="with --parts: the GPU kernels of the cheap top-k, the check "
                                                                 "and the estimated column max instead")
    args = parser.parse_args()
    if args.kernels and not args.parts:
        parser.error("--kernels lists the kernels of one head family's parts: give --parts FAMILY")
    require_cuda("this probe")
    shape = SHAPES["wan14b-480p"]
    print(torch.cuda.get_device_name())
    if args.parts:
        q, k, v = family_qkv(shape, args.parts, heads=args.heads, device="cuda")
        print(f"{args.parts}, {args.heads} heads, d = {args.densities[0]}: cuDNN dense "
              f"{queued_ms(sdpa_call(q, k, v, 'cudnn')):.3f} ms (queued)")
        (kernel_table if args.kernels else parts)(q, k, args.densities[0])
        return
    inputs = [(f, lambda f=f: family_qkv(shape, f, heads=args.heads, device="cuda")) for f in FAMILIES]
    inputs += [(f"workload-{p}", lambda p=p: video_qkv(shape, p, head_ids=range(args.heads), device="cuda"))
               for p in PATTERNS]
    print("| heads | d | cuDNN dense | top-k | auto (heads predicted again; of them, with the exact LSE) | colmax, estimated LSE | "
          "top-k, auto queued (of cuDNN queued) |")
    print("|---|---|---|---|---|---|---|")
    for name, make in inputs:
        q, k, v = make()
        dense = call_ms(sdpa_call(q, k, v, "cudnn"))
        dense_queued = queued_ms(sdpa_call(q, k, v, "cudnn"))  # the queued column's own baseline
        for d in args.densities:
            scale = q.shape[-1] ** -0.5
            cheap = predict_mask(q, k, 128, "topk", density=d)
            check = auto_mask.check_heads(q, k, cheap, predict_mask, scale,
                                          dict(density=d, top_k=None, scale=scale, workspace_bytes=1 << 32))
            flagged = auto_mask.flagged_heads(check)
            estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=d)
            exact_lse = [h for h in auto_mask.flagged_heads(check.against(estimated, k, scale)) if h in flagged]
            calls = [lambda m=m, kw=kw, q=q, k=k: predict_mask(q, k, 128, m, density=d, **kw)
                     for m, kw in (("topk", {}), ("auto", {}), ("colmax", dict(lse="estimate")))]
            pct = [f"{t:.2f} ms ({100 * t / dense:.1f} %)" for t in map(call_ms, calls)]
            queued = " / ".join(f"{100 * queued_ms(fn) / dense_queued:.1f} %" for fn in calls[:2])
            print(f"| {name} | {d} | {dense:.2f} ms | {pct[0]} | {pct[1]} ({len(flagged)} of {q.shape[1]}; {len(exact_lse)} exact LSE) | {pct[2]} "
                  f"| {queued} |", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

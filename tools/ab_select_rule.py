"""The top-k selection kernel against the kernel taking any rule, on the same score rows.

    PYTHONPATH=. python -m tools.ab_select_rule   (GPU)

Both are ``fg::select_rows`` (cuda_src/mask_select.cu), the second with the rule compiled in.
Prints each one's NVRTC compile time for the staged bfloat16 rows of the cheap top-k prediction,
then, per row length (32,760 and 75,600 keys, 40 heads of 128-query blocks), row kind (flat
random probabilities, or peaked: their 8th powers) and density, both kernels' CUDA-event
medians over alternating calls and whether they kept the same keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from fgcupy import mask_kernels
from fgcupy.jit.compile import compile_cubin
from fgcupy.jit.score_spec import SELECT_LARGE_SMEM, SelectSpec
from fgcupy.mask_request import make_request


def compile_times() -> None:
    for rule in ("any", "topk"):
        started = time.perf_counter()
        compile_cubin(SelectSpec(True, "bfloat16", SELECT_LARGE_SMEM, rule=rule), "sm_90a")
        print(f"compile select staged bf16 rule={rule}: {time.perf_counter() - started:.2f} s", flush=True)


def timed_select(spec, vals, kv_len, req) -> tuple:
    with mock.patch.object(mask_kernels, "select_spec", lambda *args, **kwargs: spec):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        counts, bits = mask_kernels.gpu_select(vals, kv_len, req, bits=True)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end), counts, bits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.ab_select_rule", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="alternating calls of each (the first 3 not timed)")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name())
    compile_times()
    torch.manual_seed(0)
    for kv_len, heads in ((32_760, 40), (75_600, 40)):
        ld = mask_kernels.row_stride(kv_len, 2)
        for kind in ("flat", "peaked"):
            vals = torch.rand(heads, -(-kv_len // 128), ld, device="cuda")
            vals = (vals ** 8 if kind == "peaked" else vals).to(torch.bfloat16)
            for density in (0.1, 0.3):
                req = make_request(128, kv_len, 128, "topk", density=density)
                # The kernel taking any rule (what a tau request gets) and top-k's own.
                specs = {"any": mask_kernels.select_spec(vals.device, ld, "bfloat16", "tau"),
                         "topk": mask_kernels.select_spec(vals.device, ld, "bfloat16", "topk")}
                times, kept = {rule: [] for rule in specs}, {}
                for i in range(args.rounds):
                    for rule, spec in specs.items():
                        ms, counts, bits = timed_select(spec, vals, kv_len, req)
                        if i >= 3:
                            times[rule].append(ms)
                        kept[rule] = (counts, bits)
                same = all(torch.equal(a, b) for a, b in zip(kept["any"], kept["topk"]))
                print(f"kv {kv_len} {kind} d={density}: any-rule kernel {statistics.median(times['any']):.3f} ms, "
                      f"top-k kernel {statistics.median(times['topk']):.3f} ms, same keys {same} "
                      f"({specs['any'].name} vs {specs['topk'].name})", flush=True)


if __name__ == "__main__":
    main()

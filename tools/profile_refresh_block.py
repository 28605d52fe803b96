"""The kernels of a Wan-14B-sized diffusers block on reused-mask calls and on refresh calls
(predict + plan + run) through the diffusers integration, top-k density 0.1, random weights
(GPU, diffusers installed; torch.profiler, three calls of each):

    PYTHONPATH=. python -m tools.profile_refresh_block [32760 | 75600]
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fgcupy.integrations.diffusers as fd
from bench.bench_e2e import block_call, build_wan


def main() -> None:
    seq = int(sys.argv[1]) if len(sys.argv) > 1 else 32_760
    model = build_wan(1)
    run_block = block_call(model, seq)
    print(torch.cuda.get_device_name(), "| tokens", seq)
    for name, every in (("reuse", 10**9), ("refresh", 1)):
        handle = fd.apply(model, fd.SparseAttentionConfig(refresh_every=every, predictor="topk", density=0.1))
        steps = iter(range(10**9))

        def call():
            handle.set_step(next(steps) if every == 1 else 1)
            run_block()

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
        print(f"==== {name} (3 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        fd.remove(model)


if __name__ == "__main__":
    main()

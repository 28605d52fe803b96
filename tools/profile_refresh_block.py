"""What a refresh adds to a Wan-14B-sized diffusers block: the kernels of reused-mask calls and
of refresh calls through the diffusers integration, top-k density 0.1, random weights (GPU,
diffusers installed; torch.profiler, three calls of each), then per kernel the GPU time a
refresh call adds over a reuse call. Refreshes as SparseAttentionConfig's default makes them
without dense steps (a sparse call, a local search, the column max over its candidates), or
with ``--predicted`` as the predicted schedule does (predict + plan + run):

    PYTHONPATH=. python -m tools.profile_refresh_block [32760 | 75600] [--predicted]
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fgcupy.integrations.diffusers as fd
from bench.bench_e2e import GRIDS, block_call, build_wan

CALLS = 3


def kernel_times(prof) -> tuple:
    """({kernel name: GPU microseconds per call}, {kernel name: launches per call})."""
    times, launches = {}, {}
    for avg in prof.key_averages():
        if avg.device_type == torch.autograd.DeviceType.CUDA:
            times[avg.key] = getattr(avg, "self_device_time_total", 0.0) / CALLS
            launches[avg.key] = avg.count / CALLS
    return times, launches


def block_caller(model, run_block, every: int, predicted: bool, seq: int):
    """fgcupy applied to ``model`` (top-k 0.1, no dense step; refreshes predict with ``predicted``,
    else search around the old mask along the token grid of ``seq`` tokens) and a call of its
    block that refreshes the mask every ``every`` steps (1: every call; a huge value: the mask
    of the first call reused)."""
    # The block is called alone: the search's grid is given (a transformer call would give it).
    schedule = dict(sparse_refresh=False) if predicted else dict(grid=GRIDS[seq])
    handle = fd.apply(model, fd.SparseAttentionConfig(refresh_every=every, predictor="topk", density=0.1,
                                                      dense_steps=0, **schedule))
    steps = iter(range(10**9))

    def call():
        handle.set_step(next(steps) if every == 1 else 1)
        run_block()

    return call


def profile_arguments(prog: str, doc: str, argv=None) -> argparse.Namespace:
    """The refresh profiles' arguments: the block's tokens, and which schedule's refreshes."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seq", nargs="?", type=int, default=32_760,
                        help="tokens of the block's sequence (default 32760)")
    parser.add_argument("--predicted", action="store_true",
                        help="refreshes predict anew (sparse_refresh=False) instead of searching")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = profile_arguments("python -m tools.profile_refresh_block", __doc__, argv)
    model = build_wan(1)
    run_block = block_call(model, args.seq)
    print(torch.cuda.get_device_name(), "| tokens", args.seq, "| refreshes", "predict" if args.predicted else "search")
    measured = {}
    for name, every in (("reuse", 10**9), ("refresh", 1)):
        call = block_caller(model, run_block, every, args.predicted, args.seq)
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                call()
            torch.cuda.synchronize()
        print(f"==== {name} ({CALLS} calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        measured[name] = kernel_times(prof)
        fd.remove(model)
    (reuse, _), (refresh, launches) = measured["reuse"], measured["refresh"]
    added = {k: refresh[k] - reuse.get(k, 0.0) for k in refresh.keys() | reuse.keys()}
    print(f"==== GPU time a refresh call adds (per call): {sum(added.values()) / 1e3:.3f} ms "
          f"(reuse {sum(reuse.values()) / 1e3:.3f} ms, refresh {sum(refresh.values()) / 1e3:.3f} ms of kernels)")
    for kernel, us in sorted(added.items(), key=lambda kv: -abs(kv[1])):
        if abs(us) >= 5.0:
            print(f"{us / 1e3:9.3f} ms  x{launches.get(kernel, 0):5.1f}  {kernel[:110]}")


if __name__ == "__main__":
    main()

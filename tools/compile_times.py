"""How long NVRTC takes to compile each default Hopper attention kernel and the mma.sync kernel
that stands in for it on a cold first call (attention_kernel.runnable_spec): medians of a few
compiles in this process, on this machine's CPU (no GPU needed).

    PYTHONPATH=. python -m tools.compile_times [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from fgcupy.attention_kernel import stand_in_spec
from fgcupy.jit.compile import compile_cubin
from fgcupy.tiles import default_spec

SHAPES = ((128, 128), (128, 64), (64, 128), (96, 128))


def _median_s(spec, arch: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        compile_cubin(spec, arch)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print("| head dim, slice | Hopper kernel | NVRTC (s) | stand-in | NVRTC (s) |")
    print("|---|---|---|---|---|")
    for head_dim, slice_m in SHAPES:
        hopper = default_spec("bfloat16", head_dim, slice_m, "sm_90")
        stand_in = stand_in_spec(hopper)
        arch = getattr(hopper, "arch", None) or "sm_90"
        print(f"| {head_dim}, {slice_m} | {hopper.name} | {_median_s(hopper, arch, args.reps):.2f} | "
              f"{stand_in.name} | {_median_s(stand_in, 'sm_90', args.reps):.2f} |", flush=True)


if __name__ == "__main__":
    main()

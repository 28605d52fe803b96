"""Where the host's time goes in ``predict_mask(method="auto")``: calls timed one by one (each
followed by a synchronisation), then the same calls under cProfile, on 8 heads of two head
families (none flagged: gauss-fine at d = 0.1; all flagged: window2d at d = 0.3).

    PYTHONPATH=. python -m tools.profile_auto_host [--reps 20]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import torch

from fgcupy import predict_mask
from fgcupy.head_families import family_qkv


def profile(family: str, density: float, reps: int) -> None:
    q, k, _ = family_qkv("wan14b-480p", family, heads=8, device="cuda")

    def call():
        predict_mask(q, k, 128, "auto", density=density)
        torch.cuda.synchronize()

    for _ in range(3):
        call()
    start = time.perf_counter()
    for _ in range(reps):
        call()
    print(f"### {family} d={density}: {1e3 * (time.perf_counter() - start) / reps:.3f} ms per call, one by one",
          flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        call()
    prof.disable()
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(70)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), flush=True)
    for family, density in (("gauss-fine", 0.1), ("window2d", 0.3)):
        profile(family, density, args.reps)


if __name__ == "__main__":
    main()

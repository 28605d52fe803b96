"""``predict_mask(method="auto")`` and the estimated column max timed on this tree and on another
checkout of the project, alternating in one run, beside SDPA cuDNN dense attention of the same
heads (CUDA-event medians of calls one by one, and queued; wan14b-480p grid).

    PYTHONPATH=. python -m tools.ab_prediction_trees /path/to/other/tree [--families gauss-sharp:8 window2d:40]

Each measurement runs in a fresh process whose ``PYTHONPATH`` is its tree, so both trees compile
and cache their own kernels (GPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent.parent


def measure(family: str, heads: int) -> str:
    """One line: the two calls' times on ``heads`` heads of ``family`` (the tree on sys.path)."""
    import fgcupy
    from bench.cases import sdpa_call
    from fgcupy import predict_mask
    from fgcupy.head_families import family_qkv
    from fgcupy.timing import cuda_time_ms
    from fgcupy.workloads import SHAPES
    from tools.scoring_setup import queued_ms

    q, k, v = family_qkv(SHAPES["wan14b-480p"], family, heads=heads, device="cuda")
    dense = queued_ms(sdpa_call(q, k, v, "cudnn"))
    calls = {"auto": lambda: predict_mask(q, k, 128, "auto", density=0.1),
             "colmax, estimated LSE": lambda: predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)}
    parts = [f"{Path(fgcupy.__file__).parent.parent} {family} {heads} heads: cuDNN {dense:.3f} ms"]
    for name, fn in calls.items():
        one = cuda_time_ms(fn, warmup=2, reps=10)["median_ms"]
        parts.append(f"{name} {one:.3f} ms one by one ({100 * one / dense:.1f} %), {queued_ms(fn):.3f} ms queued")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (its top-level folder)")
    parser.add_argument("--families", nargs="+", default=["gauss-sharp:8", "window2d:40"], metavar="FAMILY:HEADS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # FAMILY HEADS, in a child process
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure[0], int(args.measure[1])), flush=True)
        return
    for item in args.families:
        family, heads = item.split(":")
        for round_ in range(args.rounds):
            trees = (_HERE, args.other.resolve())
            for tree in trees if round_ % 2 == 0 else trees[::-1]:  # each goes first in turn
                env = dict(os.environ, PYTHONPATH=str(tree))
                subprocess.run([sys.executable, str(_HERE / "tools" / "ab_prediction_trees.py"), str(args.other),
                                "--measure", family, heads], env=env, cwd=tree, check=True)


if __name__ == "__main__":
    main()

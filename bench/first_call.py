"""Time of the first sparse_attention of a new process, cold (empty kernel cache) and warm.

    python -m bench.first_call [--cold N] [--warm N]   (GPU; fresh processes; prints both and a profile)

Each measurement is a new Python process that imports torch (not counted: a model has it
already), then times ``import fgcupy`` plus the first ``sparse_attention`` call until its
result is on the host. "cold" points FGCUPY_CACHE_DIR (compiled kernels, autotune file) and
CUPY_CACHE_DIR at empty folders; "warm" reuses them. fgcupy's bytecode is compiled first, as
an installed package's is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import cProfile, io, json, pstats, sys, time
import torch
torch.cuda.init()
q = torch.randn(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
prof = cProfile.Profile()
profiled = sys.argv[1:] == ["--profile"]
t0 = time.perf_counter()
if profiled:
    prof.enable()
import fgcupy
t1 = time.perf_counter()
mask = fgcupy.SliceMask.full(1, 2, 1024, 1024, 128, device="cuda")
torch.cuda.synchronize()
t2 = time.perf_counter()
out = fgcupy.sparse_attention(q, q, q, mask)
torch.cuda.synchronize()
prof.disable()
t3 = time.perf_counter()
total = t3 - t0
stages = {"import": t1 - t0, "mask": t2 - t1, "attention": t3 - t2}
buf = io.StringIO()
if profiled:
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
print(json.dumps({"seconds": total, "stages": stages, "profile": buf.getvalue(), "cupy_imported": "cupy" in sys.modules}))
"""


def run_child(cache_dir: str, autotune_dir: str, profile: bool = False) -> dict:
    env = dict(os.environ, CUPY_CACHE_DIR=cache_dir, FGCUPY_CACHE_DIR=autotune_dir, FGCUPY_AUTOTUNE="0")  # no tune timed
    argv = [sys.executable, "-c", CHILD] + (["--profile"] if profile else [])
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the first-call process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), cache=cache_dir, tuned=autotune_dir)


def _fresh_dirs() -> tuple:
    return tempfile.mkdtemp(prefix="fgcupy-first-call-"), tempfile.mkdtemp(prefix="fgcupy-tune-")


def measure(cold_runs: int = 2, warm_runs: int = 3) -> tuple[list, list]:
    """(cold, warm) child results: the first cold process fills a fresh cache that the warm ones
    reuse; further cold ones start from fresh caches (the machine's first process also reads
    NVRTC's and the driver's files from disk)."""
    import compileall

    import fgcupy

    compileall.compile_dir(os.path.dirname(fgcupy.__file__), quiet=1)
    cache, tuned = _fresh_dirs()
    cold = [run_child(cache, tuned)] + [run_child(*_fresh_dirs()) for _ in range(cold_runs - 1)]
    warm = [run_child(cache, tuned) for _ in range(warm_runs)]
    return cold, warm


def summary(cold: list, warm: list) -> str:
    """The lines bench.first_call and bench.report_attention print."""
    def ms(runs):
        return ", ".join(f"{r['seconds'] * 1e3:.0f}" for r in runs)

    lines = [f"first sparse_attention of a process (import fgcupy included): cold {ms(cold)} ms, warm {ms(warm)} ms"]
    runs = [(f"cold {i}", c) for i, c in enumerate(cold)] + [(f"warm {i}", w) for i, w in enumerate(warm)]
    lines += [f"{name}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in w["stages"].items()) for name, w in runs]
    lines.append(f"cupy imported: cold {[c['cupy_imported'] for c in cold]}, warm {[w['cupy_imported'] for w in warm]}")
    return "\n".join(lines)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=2, help="cold processes (each with fresh caches)")
    parser.add_argument("--warm", type=int, default=3, help="warm processes (reusing the first cold one's caches)")
    args = parser.parse_args()
    if args.cold < 1 or args.warm < 0:
        parser.error("--cold must be >= 1 and --warm >= 0")
    from bench.timing import require_cuda

    require_cuda("bench.first_call")
    cold, warm = measure(args.cold, args.warm)
    warm_profile = run_child(cold[0]["cache"], cold[0]["tuned"], profile=True)
    cold_profile = run_child(*_fresh_dirs(), profile=True)
    print(summary(cold, warm))
    print("\nwarm profile (cumulative; the profiler slows what it times):\n" + warm_profile["profile"])
    print("\ncold profile (cumulative):\n" + cold_profile["profile"])


if __name__ == "__main__":
    main()

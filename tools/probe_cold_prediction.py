"""A cold first sparse step: the cheap top-k prediction and a one-shot attention over its mask in
fresh processes with empty kernel caches, with the kernels loaded ahead on threads and without.

    PYTHONPATH=. python -m tools.probe_cold_prediction [--rounds 2] [--heads 8] [--seq 32760] [--exact]   (GPU)

``--exact`` times instead the diffusers integration's default first step: a dense attention with
its LSE (``dense_attention_with_lse``), then the exact column-max mask (top-k 0.1); "on" starts
loading that prediction's kernels (``gpu_prediction.colmax_kernels``) before the dense call, as
the integration does, "off" leaves them to the prediction.

Each measurement is a new process (torch imported and a CUDA context made first, not counted)
timing ``import fgcupy`` plus ``predict_mask`` (top-k 0.1), then ``sparse_attention``, each
until its result is on the host, and listing the kernels it loaded and how long each took.
"Without" replaces ``gpu_prediction.load_in_background`` with a no-op, so every kernel compiles
when its launch needs it. A throwaway cold process runs first (the machine's first process also
reads NVRTC and the driver from disk); then the two alternate, and two warm processes reuse a
filled cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, logging, sys, time
import torch
heads, seq, ahead = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "on"
torch.cuda.init()
q = torch.randn(1, heads, seq, 128, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
logging.basicConfig(level=logging.INFO, format="%(message)s")
t0 = time.perf_counter()
import fgcupy
if sys.argv[4] == "exact":
    from fgcupy.attention import dense_attention_with_lse
    from fgcupy.gpu_prediction import colmax_kernels
    from fgcupy.jit.runtime import load_in_background
    if ahead:
        for spec in colmax_kernels("bfloat16", 128, 128, seq, "topk", q.device):
            load_in_background(q.device, spec)
    _, lse = dense_attention_with_lse(q, q, q, 128)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    fgcupy.predict_mask(q, q, 128, "colmax", lse=lse, rule="topk", density=0.1)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(json.dumps({"dense_s": round(t1 - t0, 3), "colmax_s": round(t2 - t1, 3), "step_s": round(t2 - t0, 3)}))
    sys.exit(0)
if not ahead:
    import fgcupy.gpu_prediction as gp
    gp.load_in_background = lambda device, spec: None
mask = fgcupy.predict_mask(q, q, 128, "topk", density=0.1)
torch.cuda.synchronize()
t1 = time.perf_counter()
fgcupy.sparse_attention(q, q, q, mask)
torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"predict_s": round(t1 - t0, 3), "attention_s": round(t2 - t1, 3)}))
"""


def run_child(cache: str | None, heads: int, seq: int, ahead: bool, mode: str = "predicted") -> tuple:
    """One child process on ``cache`` (None: a fresh folder, removed afterwards); ``mode``
    "predicted" (the cheap top-k prediction, then attention) or "exact" (a dense step, then its
    column-max mask)."""
    folder = cache or tempfile.mkdtemp(prefix="fgcupy-cold-")
    env = dict(os.environ, FGCUPY_CACHE_DIR=folder, CUPY_CACHE_DIR=folder)
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(heads), str(seq), "on" if ahead else "off", mode], env=env,
                              capture_output=True, text=True)
    finally:
        if cache is None:
            shutil.rmtree(folder, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"the child process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    loads = [line.split("loaded ", 1)[1] for line in done.stderr.splitlines() if "fgcupy: loaded" in line]
    return json.loads(done.stdout.strip().splitlines()[-1]), loads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.probe_cold_prediction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="cold pairs (with and without loading ahead)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32_760)
    parser.add_argument("--exact", action="store_true", help="the integration's default first step instead")
    args = parser.parse_args(argv)
    mode = "exact" if args.exact else "predicted"
    import torch

    print(torch.cuda.get_device_name(), f"| {os.cpu_count()} CPUs | {args.heads} heads x {args.seq} tokens x 128")
    print("throwaway first process", run_child(None, args.heads, args.seq, True, mode)[0])
    for _ in range(args.rounds):
        for ahead in (True, False):
            times, loads = run_child(None, args.heads, args.seq, ahead, mode)
            print(f"cold, loading ahead {'on' if ahead else 'off'}: {times}\n    " + "\n    ".join(loads), flush=True)
    cache = tempfile.mkdtemp(prefix="fgcupy-warm-")
    try:
        run_child(cache, args.heads, args.seq, True, mode)
        print("warm", [run_child(cache, args.heads, args.seq, True, mode)[0] for _ in range(2)])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()

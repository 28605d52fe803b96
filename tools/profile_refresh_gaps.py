"""Where a refresh call of a Wan-14B-sized diffusers block spends its time, against a reuse call:
idle gaps on the GPU timeline and host calls that block (torch.profiler, one call of each after
warm-up, top-k density 0.1, random weights), then each kernel's time in the two calls, largest
differences first.

    PYTHONPATH=. python -m tools.profile_refresh_gaps [32760 | 75600] [--predicted]   (GPU, diffusers)

Refreshes as SparseAttentionConfig's default makes them without dense steps, or with
``--predicted`` each predicting anew.
"""

import json
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

import fgcupy.integrations.diffusers as fd
from bench.bench_e2e import block_call, build_wan
from tools.profile_refresh_block import block_caller, profile_arguments

GPU_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")
BLOCKING = ("Synchronize", "Malloc", "Free", "Memcpy", "HostAlloc")


def timeline(run_block, model, every: int, predicted: bool, seq: int) -> list:
    """GPU events (chrome-trace dicts, in start order) and blocking host calls of one block call."""
    call = block_caller(model, run_block, every, predicted, seq)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    fd.remove(model)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_EVENTS), key=lambda e: e["ts"])
    blocking = [e for e in events if e.get("cat") == "cuda_runtime" and e.get("dur", 0) > 10
                and any(word in e.get("name", "") for word in BLOCKING)]
    return gpu, blocking


def report(name: str, gpu: list, blocking: list) -> None:
    busy = sum(e["dur"] for e in gpu)
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    print(f"==== {name}: {len(gpu)} GPU operations, busy {busy / 1e3:.3f} ms, span {span / 1e3:.3f} ms, "
          f"idle {(span - busy) / 1e3:.3f} ms")
    gaps = [(b["ts"] - a["ts"] - a["dur"], a["name"][:70], b["name"][:70]) for a, b in zip(gpu, gpu[1:])]
    for gap, before, after in sorted((g for g in gaps if g[0] > 15), reverse=True)[:10]:
        print(f"  idle {gap:8.1f} us after {before} before {after}")
    for e in blocking:
        print(f"  host call {e['name']} {e['dur']:.1f} us")


def main(argv=None) -> None:
    args = profile_arguments("python -m tools.profile_refresh_gaps", __doc__, argv)
    model = build_wan(1)
    run_block = block_call(model, args.seq)
    print(torch.cuda.get_device_name(), "| tokens", args.seq, "| refreshes", "predict" if args.predicted else "search")
    per_kernel = {}
    for name, every in (("reuse", 10**9), ("refresh", 1)):
        gpu, blocking = timeline(run_block, model, every, args.predicted, args.seq)
        report(name, gpu, blocking)
        totals = {}
        for e in gpu:
            count, us = totals.get(e["name"][:90], (0, 0.0))
            totals[e["name"][:90]] = (count + 1, us + e["dur"])
        per_kernel[name] = totals
    reuse, refresh = per_kernel["reuse"], per_kernel["refresh"]
    print("==== per kernel: refresh - reuse (ms), launches and ms in each call")
    rows = []
    for kernel in reuse.keys() | refresh.keys():
        (na, ta), (nb, tb) = reuse.get(kernel, (0, 0.0)), refresh.get(kernel, (0, 0.0))
        rows.append((tb - ta, na, ta, nb, tb, kernel))
    for diff, na, ta, nb, tb, kernel in sorted(rows, key=lambda r: -abs(r[0]))[:20]:
        print(f"{diff / 1e3:8.3f} ms  reuse {na:3d} x {ta / 1e3:8.3f}  refresh {nb:3d} x {tb / 1e3:8.3f}  {kernel}")


if __name__ == "__main__":
    main()

"""The default attention kernel built with NVRTC's quick optimisation (``--Ofast-compile=mid``)
beside the usual build: the time each compile takes and each kernel's speed, wan14b-480p, SDPA
cuDNN in the same run (GPU). Asks whether a cold process could run a quick build first:

    python -m tools.ab_quick_build
"""

import time

import torch

from bench.cases import random_inputs, random_topk_mask, sdpa_call
from fgcupy import SliceMask, SparseAttention
from fgcupy.jit import driver, runtime
from fgcupy.jit.compile import compile_cubin
from fgcupy.timing import cuda_time_ms

B, H, S, D = 1, 40, 32760, 128
QUICK = ("--Ofast-compile=mid",)


def main() -> None:
    q, k, v = random_inputs(B, H, S, D)
    device = torch.device("cuda", torch.cuda.current_device())
    print(torch.cuda.get_device_name(), "| wan14b-480p", (B, H, S, D))
    cudnn = cuda_time_ms(sdpa_call(q, k, v, "cudnn"), reps=10)["median_ms"]
    print(f"sdpa-cudnn dense {cudnn:.2f} ms")
    masks = {"dense": SliceMask.full(B, H, S, S, 128, device="cuda"),
             "random 0.3": random_topk_mask(B, H, S, S, 128, 0.3), "random 0.1": random_topk_mask(B, H, S, S, 128, 0.1)}
    plans = {name: SparseAttention().plan(mask, head_dim=D, dtype=q.dtype) for name, mask in masks.items()}
    spec = plans["dense"].spec
    arch = getattr(spec, "arch", None) or runtime.device_arch(device.index)
    builds = {}
    for name, extra in (("optimised", ()), ("quick", QUICK)):
        started = time.perf_counter()
        compiled = compile_cubin(spec, arch, extra)
        print(f"{spec.name} {name} build: NVRTC {time.perf_counter() - started:.2f} s")
        function = driver.Function(compiled.cubin, compiled.lowered_name, device.index, spec.smem_bytes)
        builds[name] = runtime.DriverKernel(function)
    key = (spec, device.index)  # the process's kernel table entry, swapped per timing
    for name, plan in plans.items():
        times = {b: [] for b in builds}
        for _ in range(2):  # alternate, so drift hits both
            for build, kernel in builds.items():
                runtime._kernels[key] = kernel
                times[build].append(cuda_time_ms(lambda: plan.run(q, k, v), reps=10)["median_ms"])
        print(f"{name:11s} " + "  ".join(f"{b} {' / '.join(f'{t:.2f}' for t in ts)} ms" for b, ts in times.items())
              + f"  (quick / optimised {min(times['quick']) / min(times['optimised']):.2f})")
    runtime._kernels[key] = builds["optimised"]


if __name__ == "__main__":
    main()

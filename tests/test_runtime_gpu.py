"""A new process loads its kernels from fgcupy's disk cache, with no compiler and no cupy (GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

CHILD = r"""
import io, json, logging, sys
import torch
log = io.StringIO()
logging.basicConfig(stream=log, level=logging.INFO)
import fgcupy
q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mask = fgcupy.SliceMask.full(1, 2, 300, 300, 64, device="cuda")
out = fgcupy.sparse_attention(q, k, v, mask)
expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
print(json.dumps({"err": fgcupy.relative_l2(out.float(), expected), "log": log.getvalue(),
                  "imported": sorted(m for m in ("cupy", "cuda.bindings") if m in sys.modules),
                  "nvrtc_loaded": sys.modules["fgcupy.jit.nvrtc"]._lib is not None}))
"""


def _run(cache_dir) -> dict:
    env = dict(os.environ, FGCUPY_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_disk_without_a_compiler_or_cupy(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    assert first["err"] < 1e-2 and second["err"] < 1e-2
    assert "from NVRTC" in first["log"], first["log"]
    assert "from the disk cache" in second["log"] and "from NVRTC" not in second["log"], second["log"]
    assert second["imported"] == [] and not second["nvrtc_loaded"], second
    assert list((tmp_path / "kernels").glob("*.cubin"))


STAND_IN_CHILD = r"""
import json, time
import torch
import fgcupy
from fgcupy.jit import runtime
from fgcupy.tiles import default_spec
q, k, v = (torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mask = fgcupy.SliceMask.full(1, 2, 700, 700, 128, device="cuda")
expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
hopper = default_spec("bfloat16", 128, 128, "sm_90")
key = (hopper, torch.cuda.current_device())
plan = fgcupy.SparseAttention().plan(mask, head_dim=128)
first = plan.run(q, k, v)
compiling = key in runtime._loading_in_background or key not in runtime._kernels
graphed = torch.empty_like(q)  # captured while the Hopper kernel compiles: the stand-in, nothing loaded
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    plan.run(q, k, v, out=graphed)
graph.replay()
torch.cuda.synchronize()
deadline = time.monotonic() + 120
while key in runtime._loading_in_background and time.monotonic() < deadline:
    time.sleep(0.05)
later = plan.run(q, k, v)  # loads the binary the thread compiled
print(json.dumps({"compiling": compiling, "loaded": key in runtime._kernels,
                  "err": [fgcupy.relative_l2(o.float(), expected) for o in (first, graphed, later)],
                  "loaded_specs": sorted(type(s).__name__ for s, _ in runtime._kernels)}))
"""


def test_a_cold_hopper_plan_runs_the_portable_kernel_until_its_own_is_compiled(tmp_path):
    """With an empty kernel cache on Hopper, the first run does not wait for the warp-specialised
    kernel's compile: the mma.sync kernel stands in (same result; a CUDA graph captured meanwhile
    takes it, loading nothing) and the Hopper kernel, compiled on a thread, takes over at the
    next run."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the stand-in serves Hopper kernels only")
    env = dict(os.environ, FGCUPY_CACHE_DIR=str(tmp_path))
    env.pop("FGCUPY_STAND_IN", None)
    done = subprocess.run([sys.executable, "-c", STAND_IN_CHILD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["compiling"] and got["loaded"], got
    assert max(got["err"]) < 1e-2, got
    assert {"AttentionSpec", "Sm90WsAttentionSpec"} <= set(got["loaded_specs"]), got
